#include "model/train.hpp"

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>

#include "comm/allreduce.hpp"
#include "model/model_checkpoint.hpp"
#include "model/optim.hpp"
#include "model/rebalance.hpp"
#include "model/single_gate_train.hpp"
#include "model/train_loop.hpp"
#include "model/transformer.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/cpu.hpp"
#include "runtime/data.hpp"
#include "runtime/log.hpp"
#include "runtime/run.hpp"

namespace moe::model {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The last stop signal received (0: none). The handler only stores it; the loop reads it once per
// step and the ranks agree on it, so every rank stops after the same step.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void on_stop_signal(int sig) {
  g_stop_signal.store(sig, std::memory_order_relaxed);
}

// Resident set size of this process now, in MiB (0 if /proc is unavailable).
double current_rss_mb() {
  std::ifstream statm("/proc/self/statm");
  double pages = 0, resident = 0;
  if (!(statm >> pages >> resident)) return 0.0;
  return resident * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

// max / mean of per-rank loads (0 when nothing was routed).
double max_over_mean(const std::vector<int64_t>& v) {
  int64_t total = 0, mx = 0;
  for (int64_t x : v) total += x, mx = std::max(mx, x);
  return total > 0 ? static_cast<double>(mx) * static_cast<double>(v.size()) / total : 0.0;
}

// The held-out set is drawn from its own stream, the same for every step and rank count.
constexpr uint64_t kEvalSeedSalt = 0x6576616c5f736574ull;  // "eval_set"

struct Shape {
  int64_t global_batch, micro_batch, seq_len, accumulation;
};

Shape batch_shape(const Config& c, int n_ranks) {
  Shape s;
  s.global_batch = c.get_int("train.global_batch");
  s.micro_batch = c.get_int("train.micro_batch");
  s.seq_len = c.get_int("train.seq_len");
  const int64_t per_step = s.micro_batch * n_ranks;
  if (s.global_batch % per_step != 0)
    throw Error(ErrorKind::kConfig,
                cat("train.global_batch = ", s.global_batch, " is not divisible by ",
                    "train.micro_batch x ranks = ", s.micro_batch, " x ", n_ranks, " = ", per_step,
                    "; choose a rank count that divides ", s.global_batch / s.micro_batch));
  s.accumulation = s.global_batch / per_step;
  return s;
}

// Loss over the fixed held-out set: eval_batches global batches of the val split.
double evaluate(Transformer& model, const TokenDataset& val, const Shape& shape, uint64_t seed,
                int64_t n_batches, const comm::Communicator& comm) {
  const int64_t m = shape.micro_batch, T = shape.seq_len, P = comm.size();
  const double normaliser = static_cast<double>(n_batches * shape.global_batch * T);
  std::vector<int32_t> windows(static_cast<size_t>(m * (T + 1)));
  double local = 0;
  for (int64_t b = 0; b < n_batches; ++b)
    for (int64_t j = 0; j < shape.accumulation; ++j) {
      val.read_windows(seed ^ kEvalSeedSalt, b, j * m * P + comm.rank() * m, m, windows.data());
      local += model.forward(windows, m, T, normaliser);
    }
  return comm.sum(local, "eval loss");
}

// Router health over the MoE layers, for the metrics:
//   dead_experts  (layer, expert) pairs that received no token (kept slot) in any training
//                 micro-step of the last kDeadExpertWindow steps (of the steps run in this launch,
//                 when fewer), summed over layers;
//   router_kl     KL(z || uniform) = sum_i z_i log(E z_i), z_i = the router probability of
//                 expert i summed over the step's (or the run's) tokens, normalised; 0 = even,
//                 log E = all mass on one expert; the mean over layers.
constexpr int64_t kDeadExpertWindow = 100;

class RouterHealth {
 public:
  explicit RouterHealth(const Transformer& model) {
    for (const MoeLayer* m : model.moe_layers()) {
      const size_t E = static_cast<size_t>(m->config().n_experts);
      last_used_.emplace_back(E, -1);
      used_.emplace_back(E, 0);
      step_prob_.emplace_back(E, 0.0);
      run_prob_.emplace_back(E, 0.0);
    }
  }
  // After each training micro-step's forward.
  void add(const Transformer& model) {
    size_t l = 0;
    for (const MoeLayer* m : model.moe_layers()) {
      const MoeLoadStats& st = m->stats();
      for (size_t e = 0; e < used_[l].size(); ++e) {
        if (e < st.load.expert_tokens.size() && st.load.expert_tokens[e] > 0) used_[l][e] = 1;
        if (e < st.prob_sum.size()) step_prob_[l][e] += st.prob_sum[e];
      }
      ++l;
    }
  }
  // Closes step s: returns (dead experts, router KL of this step).
  std::pair<int64_t, double> end_step(int64_t s) {
    int64_t dead = 0;
    double kl = 0.0;
    for (size_t l = 0; l < used_.size(); ++l) {
      for (size_t e = 0; e < used_[l].size(); ++e) {
        if (used_[l][e]) last_used_[l][e] = s;
        used_[l][e] = 0;
        dead += last_used_[l][e] < 0 || s - last_used_[l][e] >= kDeadExpertWindow;
        run_prob_[l][e] += step_prob_[l][e];
      }
      kl += kl_uniform(step_prob_[l]);
      std::fill(step_prob_[l].begin(), step_prob_[l].end(), 0.0);
    }
    last_dead_ = dead;
    return {dead, used_.empty() ? 0.0 : kl / static_cast<double>(used_.size())};
  }
  int64_t last_dead() const { return last_dead_; }
  // KL of the whole launch's accumulated probabilities, mean over layers.
  double run_kl() const {
    double kl = 0.0;
    for (const auto& z : run_prob_) kl += kl_uniform(z);
    return run_prob_.empty() ? 0.0 : kl / static_cast<double>(run_prob_.size());
  }

 private:
  static double kl_uniform(const std::vector<double>& mass) {
    double total = 0.0;
    for (double v : mass) total += v;
    if (!(total > 0.0)) return 0.0;
    double kl = 0.0;
    for (double v : mass)
      if (v > 0.0) kl += (v / total) * std::log(v / total * static_cast<double>(mass.size()));
    return kl;
  }
  std::vector<std::vector<int64_t>> last_used_;  // [layers][E] last step with load, -1: none
  std::vector<std::vector<uint8_t>> used_;       // [layers][E] load in the current step
  std::vector<std::vector<double>> step_prob_, run_prob_;  // [layers][E]
  int64_t last_dead_ = 0;
};

}  // namespace

void install_stop_signal_handlers() {
  struct sigaction sa = {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // interrupted system calls (file I/O, MPI progress) resume
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGUSR1, &sa, nullptr);
}

int agree_stop_signal(const comm::Communicator& comm) {
  return comm.max(g_stop_signal.load(std::memory_order_relaxed), "stop signal");
}

const char* stop_signal_name(int sig) {
  switch (sig) {
    case SIGTERM:
      return "SIGTERM";
    case SIGUSR1:
      return "SIGUSR1";
    default:
      return "unknown";
  }
}

bool step_is_finite(int64_t s, double loss, double grad_norm, bool skip_nonfinite) {
  if (std::isfinite(loss) && std::isfinite(grad_norm)) return true;
  // Steps are numbered from 1 here as in the progress line and the metrics ("step").
  const std::string what =
      cat("step ", s + 1, ": ", !std::isfinite(loss) ? "loss" : "gradient norm", " is ",
          !std::isfinite(loss) ? loss : grad_norm);
  if (!skip_nonfinite)
    throw Error(ErrorKind::kData,
                cat(what, " (train.on_nonfinite: stop; set it to skip to drop such steps)"));
  log::warn(what, ": update skipped (train.on_nonfinite: skip)");
  return false;
}

TrainSummary train(const Config& config, const TrainOptions& options,
                   const comm::Communicator& comm) {
  const int rank = comm.rank(), P = comm.size();
  install_stop_signal_handlers();  // idempotent; moe-train installs them before MPI start-up
  if (config.get_string("model.moe.router") == "single_gate") {
    if (config.get_int("comm.rebalance.every") > 0)
      throw Error(ErrorKind::kConfig,
                  "comm.rebalance.every > 0 is not supported with model.moe.router single_gate; "
                  "set comm.rebalance.every to 0");
    return train_single_gate(config, options, comm);  // its own model class and phases
  }
  Run run = start_run(config, rank, P, "moe-train");
  const Shape shape = batch_shape(config, P);
  const uint64_t seed = static_cast<uint64_t>(config.get_int("train.seed"));
  const std::string data_path = config.get_string("data.path");

  // Data and model shape: every rank checks the same things, then all agree.
  std::unique_ptr<TokenDataset> train_data, val_data;
  std::unique_ptr<ModelConfig> mc;
  std::string error;
  ErrorKind kind = ErrorKind::kData;
  try {
    TokenFileInfo info = read_token_file_info(data_path);
    kind = ErrorKind::kConfig;
    mc = std::make_unique<ModelConfig>(ModelConfig::from(config, info.vocab_size));
    kind = ErrorKind::kData;
    train_data = std::make_unique<TokenDataset>(data_path, config.get_string("data.split"),
                                                shape.seq_len, mc->vocab_size);
    val_data = std::make_unique<TokenDataset>(data_path, "val", shape.seq_len, mc->vocab_size);
  } catch (const Error& e) {
    error = e.message();
    kind = e.kind();
  }
  comm.agree(error, kind, "open data");

  Transformer model(*mc, comm, seed);
  const AdamWOptions ao = AdamWOptions::from(config);
  // Two optimisers, one update: dense parameters, and the expert parameters (which a
  // re-placement rebuilds, model/rebalance.hpp). The update is element-wise, so the split
  // changes no value.
  AdamW opt(ao), expert_opt(ao);
  for (const ParamRef& p : model.dense_params()) opt.add(p, !model.no_decay(p.name));
  for (const ParamRef& p : model.expert_params()) expert_opt.add(p, true);
  const RebalanceConfig rebalance_config = RebalanceConfig::from(config);
  std::unique_ptr<ExpertRebalancer> rebalancer;
  if (rebalance_config.enabled() && mc->n_moe_layers() > 0)
    rebalancer = std::make_unique<ExpertRebalancer>(rebalance_config, model, comm);
  LrSchedule schedule;
  schedule.lr = config.get_float("train.lr");
  schedule.min_lr = config.get_float("train.min_lr");
  schedule.warmup_steps = config.get_int("train.warmup_steps");
  schedule.total_steps = config.get_int("train.steps");

  std::vector<View> dense_grads;
  std::vector<ConstView> dense_cgrads, expert_cgrads;
  // Row-sparse gradients (PEER's U and V): the norm visits only these rows (and AdamW, through
  // ParamRef::sparse_rows, only updates them).
  std::vector<const std::vector<int64_t>*> expert_rows;
  for (const ParamRef& p : model.dense_params()) {
    dense_grads.push_back(p.grad);
    dense_cgrads.push_back(p.grad);
  }
  // Expert gradients for the global norm: each expert once (replicas are left out).
  auto collect_expert_grads = [&] {
    expert_cgrads.clear();
    expert_rows.clear();
    for (const ParamRef& p : model.expert_params()) {
      if (p.replica) continue;
      expert_cgrads.push_back(p.grad);
      expert_rows.push_back(p.sparse_rows);
    }
  };
  collect_expert_grads();
  comm::AllReduceOptions ro;
  ro.bucket_bytes = static_cast<int64_t>(config.get_float("comm.bucket_mb") * (1 << 20));
  ro.average = false;  // the loss is already normalised by the global token count
  comm::GradientAllReducer reducer(comm, dense_grads, ro);

  // Checkpoint entries: dense tensors once, experts by (block, global id), with their moments.
  auto adam_state = [&](const std::string& name) -> AdamState& {
    if (int64_t i = opt.find(name); i >= 0) return opt.state(static_cast<size_t>(i));
    int64_t i = expert_opt.find(name);
    MOE_CHECK(i >= 0, "optimiser lacks ", name);
    return expert_opt.state(static_cast<size_t>(i));
  };
  CheckpointEntries entries = checkpoint_entries(model, adam_state);
  TrainLoop loop(config, run.dir, comm);

  int64_t start_step = 0;
  if (!options.resume.empty()) {
    // comm.rebalance's placement and load averages (model/rebalance.hpp), taken back before
    // the tensors are read, so that each rank reads the experts of the saved map. A file every
    // rank cannot read leaves them out everywhere; checkpoint::load below names the problem.
    checkpoint::StateArrays saved;
    int unreadable = 0;
    try {
      saved = checkpoint::read_state(options.resume);
    } catch (const Error&) {
      unreadable = 1;
    }
    if (comm.max(unreadable, "checkpoint state") != 0) saved = {};
    std::string not_used;
    if (rebalancer) {
      not_used = rebalancer->restore(saved, model, expert_opt);
      if (not_used.empty()) {
        collect_expert_grads();
        entries = checkpoint_entries(model, adam_state);
        log::info0("expert placement and load averages restored from the checkpoint (",
                   rebalancer->replicas(), " replica(s), ", rebalancer->rebalances(),
                   " re-placement(s) so far)");
      }
    } else if (ExpertRebalancer::saved(saved)) {
      not_used = "comm.rebalance.every is 0";
    }
    if (!not_used.empty())
      log::info0("the checkpoint's expert placement is not used (", not_used,
                 "): experts start in blocks");
    // Replicas of the restored map are read from their expert's stored tensors too.
    const CheckpointEntries load_entries = checkpoint_entries(model, adam_state, true);
    checkpoint::Metadata meta =
        checkpoint::load(options.resume, load_entries.dense, load_entries.experts, comm);
    start_step = meta.step;
    if (meta.seed != static_cast<int64_t>(seed))
      log::warn("resuming a run with train.seed ", meta.seed, " under train.seed ", seed,
                ": the data order changes");
    log::info0("resumed from ", options.resume, " at step ", start_step, " (written by ",
               meta.world_size, " rank(s), now ", P, ")");
  }
  const int64_t total_steps = schedule.total_steps;
  const int64_t end_step =
      options.stop_after > 0 ? std::min(total_steps, start_step + options.stop_after) : total_steps;

  // The job's fp32 peak: every rank's threads at the measured clock. Every rank measures at
  // once (none busy-waits in MPI meanwhile, which could slow a sibling hardware thread) and the
  // fastest clock wins.
  const CpuPeak peak = measure_cpu_peak(1);
  const double per_thread_gflops = comm.max(peak.gflops, "peak");
  const double job_peak = comm.sum(per_thread_gflops * run.threads.omp_threads, "peak");
  const double flops_per_token = mc->flops_per_token(shape.seq_len);

  // Memory before the first step: libraries, MPI, parameters, gradients and Adam states.
  const double rss_setup_mb = current_rss_mb();
  const int64_t tensors_setup = tensor_bytes_live();
  loop.begin(options, start_step, end_step, total_steps);
  const int64_t m = shape.micro_batch, T = shape.seq_len;
  const double normaliser = static_cast<double>(shape.global_batch * T);
  const double tokens_per_step = normaliser;

  log::info0("model: ", mc->n_layers, " blocks (", mc->n_moe_layers(), " MoE), d_model ",
             mc->d_model, ", vocab ", mc->vocab_size, ", ",
             mc->layer_experts.empty()
                 ? cat(mc->moe.n_experts)
                 : cat("(", config.get_string("model.moe.layer_experts"), ")"),
             " experts top-", mc->moe.top_k, " router ", router_kind_name(mc->moe.router), "; ",
             mc->active_params() / 1e6, "M active parameters; batch ", shape.global_batch, " x ", T,
             " tokens = ", P, " ranks x ", m, " x ", shape.accumulation, " accumulation; steps ",
             start_step, " -> ", end_step, " of ", total_steps, "; peak ", job_peak, " GFLOP/s");
  if (mc->peer_layer >= 0)
    log::info0("PEER in block ", mc->peer_layer, ": ", mc->peer.n_experts(), " experts, ",
               mc->peer.heads, " heads x top-", mc->peer.top_k, ", d_key ", mc->peer.d_key,
               ", batch norm ", mc->peer.batch_norm ? "on" : "off");

  std::vector<int32_t> windows(static_cast<size_t>(m * (T + 1)));
  double exchange_sum = 0, imbalance_sum = 0, rank_imbalance_sum = 0;
  RouterHealth health(model);
  const int64_t peer_usage_window = config.get_int("model.peer.usage_window");
  for (int64_t s = start_step; s < end_step; ++s) {
    const double t0 = now_s();
    model.zero_grad();
    double loss_local = 0, aux = 0, lb = 0, z = 0, imbalance = 0, drop = 0, exch = 0;
    for (int64_t j = 0; j < shape.accumulation; ++j) {
      train_data->read_windows(seed, s, j * m * P + rank * m, m, windows.data());
      loss_local += model.forward(windows, m, T, normaliser);
      const bool last = j + 1 == shape.accumulation;
      if (last) reducer.begin();
      model.backward(1.0f / static_cast<float>(shape.accumulation),
                     last ? std::function<void(size_t)>([&](size_t i) { reducer.mark_ready(i); })
                          : std::function<void(size_t)>());
      ModelStats st = model.stats();
      health.add(model);
      if (rebalancer) rebalancer->observe(model);
      aux += st.aux_loss / shape.accumulation;
      lb += st.load_balance_loss / shape.accumulation;
      z += st.z_loss / shape.accumulation;
      imbalance = std::max(imbalance, st.expert_imbalance);
      drop += st.drop_rate / shape.accumulation;
      exch += st.exchange_seconds;
    }
    reducer.finish();
    if (rebalancer) rebalancer->sum_replica_grads(model);  // replicas: one gradient per expert
    const double loss = comm.sum(loss_local, "loss");
    const double t_norm = now_s();
    const double norm = comm::global_grad_norm(dense_cgrads, expert_cgrads, comm, expert_rows);
    const double lr = schedule.at(s);
    const bool skipped = !step_is_finite(s, loss, norm, loop.skip_nonfinite());
    if (skipped) {
      loop.skip_step();
    } else {
      // Clipping inside the update: one pass over parameters, gradients and moments.
      const float clip = clip_factor(norm, config.get_float("train.grad_clip"));
      opt.step(lr, clip);
      expert_opt.step(lr, clip);
    }
    const double norm_seconds = now_s() - t_norm;  // global norm, clipping and the update
    model.end_step(!skipped);                      // router bias updates (topk_bias)
    const auto [dead_experts, router_kl] = health.end_step(s);
    // Expert load balance: this step's per-rank received slots (the exchange's statistics) and,
    // with comm.rebalance, a re-placement every N steps.
    std::vector<int64_t> rank_load(static_cast<size_t>(P), 0);
    for (const MoeLayer* ml : model.moe_layers())
      for (size_t q = 0; q < rank_load.size() && q < ml->stats().load.rank_tokens.size(); ++q)
        rank_load[q] += ml->stats().load.rank_tokens[q];
    const double rank_imbalance = max_over_mean(rank_load);
    rank_imbalance_sum += rank_imbalance;
    bool replaced = false;
    if (rebalancer && rebalancer->end_step(s, model, expert_opt)) {
      replaced = true;
      collect_expert_grads();
      entries = checkpoint_entries(model, adam_state);
      const RebalanceEvent& ev = rebalancer->last_event();
      log::info0("rebalance after step ", ev.step, ": ", ev.layers_changed, " layer(s), ",
                 ev.experts_moved, " expert instance(s) moved (",
                 static_cast<double>(ev.bytes_moved) / (1024.0 * 1024.0), " MiB, ", ev.seconds,
                 " s, staging peak ", ev.peak_extra_mb, " MiB), ", ev.replicas,
                 " replica(s), at most ", ev.max_instances, " expert(s) on a rank (cap ", ev.cap,
                 "); predicted imbalance ", ev.imbalance_before, " -> ", ev.imbalance_after,
                 ", gain ", ev.predicted_gain, "x; ", ev.moves);
    }
    imbalance_sum += imbalance;
    const double dt = now_s() - t0;
    const double tps = tokens_per_step / dt;
    const double mfu = tps * flops_per_token / (job_peak * 1e9);
    loop.count_step(dt, tokens_per_step);
    exchange_sum += exch;

    nlohmann::json rec = {{"step", s + 1},
                          {"loss", loss},
                          {"aux_loss", aux},
                          {"load_balance_loss", lb},
                          {"z_loss", z},
                          {"lr", lr},
                          {"grad_norm", norm},
                          {"tokens_per_s", tps},
                          {"mfu", mfu},
                          {"step_seconds", dt},
                          {"exchange_fraction", exch / dt},
                          {"expert_imbalance", imbalance},
                          {"drop_rate", drop},
                          {"dead_experts", dead_experts},
                          {"router_kl", router_kl},
                          {"rank_load", rank_load},
                          {"rank_imbalance", rank_imbalance}};
    if (rebalancer) {
      rec["replicas"] = rebalancer->replicas();
      rec["rebalances"] = rebalancer->rebalances();
      const auto [most, cap] = rebalancer->max_instances();
      rec["max_instances_per_rank"] = most;  // replicas included: the experts' memory
      rec["max_experts_per_rank"] = cap;     // the cap (comm.rebalance.max_experts_per_rank)
      if (replaced) {
        const RebalanceEvent& ev = rebalancer->last_event();
        rec["rebalance"] = {{"experts_moved", ev.experts_moved},
                            {"bytes_moved", ev.bytes_moved},
                            {"seconds", ev.seconds},
                            {"predicted_imbalance_before", ev.imbalance_before},
                            {"predicted_imbalance_after", ev.imbalance_after},
                            {"predicted_gain", ev.predicted_gain},
                            {"peak_extra_mb", ev.peak_extra_mb},
                            {"max_instances_per_rank", ev.max_instances},
                            {"max_experts_per_rank", ev.cap},
                            {"moves", ev.moves}};
      }
    }
    if (skipped) rec["skipped"] = true;
    for (int l = 0; l < mc->n_layers; ++l)  // PEER usage since the last window boundary
      if (PeerLayer* peer = model.peer_layer(l)) {
        const PeerUsage u = peer->usage((s + 1) % peer_usage_window == 0);
        rec["peer_usage"] = u.usage;
        rec["peer_kl"] = u.kl_uniform;
        // The last micro-step's exchange (forward + backward, bytes to other ranks only) per
        // token of the global micro-batch, and the slowest rank's retrieval time.
        const PeerStats& ps = peer->stats();
        const double tokens = comm.sum(static_cast<double>(m * T), "peer tokens");
        rec["peer_bytes_per_token"] =
            comm.sum(static_cast<double>(ps.bytes_sent), "peer bytes") / tokens;
        rec["peer_pairs_per_token"] =
            comm.sum(static_cast<double>(ps.pairs_sent), "peer pairs") / tokens;
        rec["peer_retrieval_seconds"] = comm.max(ps.retrieval_seconds, "peer retrieval");
        rec["grad_norm_seconds"] = norm_seconds;
      }
    if (loop.eval_due(s))
      rec["val_loss"] = evaluate(model, *val_data, shape, seed, loop.eval_batches(), comm);
    loop.report(s, loss, rec, [&](double eta) {
      std::string line = format_progress(s + 1, total_steps, loss, aux, tps, eta);
      if (rec.contains("val_loss")) line += cat(" | val ", rec["val_loss"].get<double>());
      line += cat(" | mfu ", static_cast<int>(std::lround(mfu * 100)), "%");
      if (mc->n_moe_layers() > 0 && P > 1) {
        line += cat(" | imb ", std::lround(rank_imbalance * 100) / 100.0);
        if (rebalancer)
          line += cat(" | repl ", rebalancer->replicas(), " moves ", rebalancer->rebalances());
      }
      return line;
    });
    if (loop.checkpoint_or_stop(s, [&] {
          CheckpointEntries e = entries;
          if (rebalancer) rebalancer->save_state(e.state);
          return e;
        }))
      break;
  }
  nlohmann::json done = loop.finish();
  TrainSummary& summary = loop.summary();
  const double time_sum = loop.time_sum();
  const int64_t steps_done = loop.steps_done();
  summary.mfu = summary.tokens_per_s * flops_per_token / (job_peak * 1e9);
  // Memory: peak resident set of the largest rank against the state every rank must hold
  // (its parameters, gradients and two Adam moments: 4 floats per parameter it owns).
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  const double rss_mb = comm.max(static_cast<double>(usage.ru_maxrss) / 1024.0, "peak rss");
  double local_params = 0;
  for (const ParamRef& p : model.dense_params())
    local_params += static_cast<double>(p.value.size());
  for (const ParamRef& p : model.expert_params())
    local_params += static_cast<double>(p.value.size());
  const double state_mb = comm.max(local_params * 4 * sizeof(float) / (1024.0 * 1024.0), "state");
  // The breakdown, on the rank with the largest peak: tensors (state + activations and
  // scratch) and the rest (libraries, MPI and its shared windows, small vectors).
  const double mib = 1024.0 * 1024.0;
  const bool top = comm.max(static_cast<double>(usage.ru_maxrss), "peak rank") ==
                   static_cast<double>(usage.ru_maxrss);
  const int top_rank = static_cast<int>(comm.max(top ? rank : -1, "peak rank"));
  const ActivationBytes act = model.activation_bytes();
  std::vector<double> mem = {rss_setup_mb,
                             static_cast<double>(tensors_setup) / mib,
                             static_cast<double>(tensor_bytes_peak()) / mib,
                             static_cast<double>(act.attention_probs) / mib,
                             static_cast<double>(act.attention_qkv) / mib,
                             static_cast<double>(act.streams) / mib,
                             static_cast<double>(act.head) / mib};
  if (rank != top_rank) std::fill(mem.begin(), mem.end(), 0.0);
  comm.allreduce_max(mem.data(), static_cast<int64_t>(mem.size()), "memory breakdown");
  const nlohmann::json memory = {
      {"peak_rss_mb", rss_mb},
      {"state_mb", state_mb},
      {"rss_before_first_step_mb", mem[0]},
      {"tensors_before_first_step_mb", mem[1]},
      {"tensors_peak_mb", mem[2]},
      {"activations_and_scratch_mb", mem[2] - mem[1]},
      {"attention_probs_mb", mem[3]},
      {"attention_qkv_out_mb", mem[4]},
      {"residual_streams_mb", mem[5]},
      {"lm_head_logits_mb", mem[6]},
      {"moe_ffn_and_scratch_mb", mem[2] - mem[1] - (mem[3] + mem[4] + mem[5] + mem[6])},
      {"non_tensor_mb", rss_mb - mem[2]}};
  log::info0("memory (rank ", top_rank, ", MiB): peak RSS ", std::lround(rss_mb), " = state ",
             std::lround(state_mb), " (params + grads + Adam m, v) + activations and scratch ",
             std::lround(mem[2] - mem[1]), " (attention probs ", std::lround(mem[3]),
             ", q/k/v/out ", std::lround(mem[4]), ", residual streams ", std::lround(mem[5]),
             ", logits ", std::lround(mem[6]), ", MoE/FFN and scratch ",
             std::lround(mem[2] - mem[1] - (mem[3] + mem[4] + mem[5] + mem[6])),
             ") + other tensors ", std::lround(mem[1] - state_mb), " + non-tensor ",
             std::lround(rss_mb - mem[2]), " (libraries, MPI, windows; ",
             std::lround(mem[0] - mem[1]), " before the first step)");
  done["mfu"] = summary.mfu;
  done["exchange_fraction"] = time_sum > 0 ? exchange_sum / time_sum : 0;
  done["expert_imbalance_mean"] = steps_done ? imbalance_sum / steps_done : 0;
  done["rank_imbalance_mean"] = steps_done ? rank_imbalance_sum / steps_done : 0;
  done["rebalances"] = rebalancer ? rebalancer->rebalances() : 0;
  done["dead_experts"] = health.last_dead();
  done["router_kl"] = health.run_kl();
  done["peak_gflops"] = job_peak;
  done["peak_rss_mb"] = rss_mb;
  done["state_mb"] = state_mb;
  done["memory"] = memory;
  loop.write_summary(done);
  return summary;
}

}  // namespace moe::model
