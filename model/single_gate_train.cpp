#include "model/single_gate_train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>

#include "comm/allreduce.hpp"
#include "model/optim.hpp"
#include "model/single_gate.hpp"
#include "model/train_loop.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/data.hpp"
#include "runtime/log.hpp"
#include "runtime/run.hpp"

namespace moe::model {

namespace {

using Phase = SingleGatePhase;

constexpr uint64_t kEvalSeedSalt = 0x6576616c5f736574ull;    // "eval_set", as model/train.cpp
constexpr uint64_t kKmeansSeedSalt = 0x6b6d65616e735f73ull;  // "kmeans_s"
constexpr int64_t kDeadWindow = 100;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Lloyd's K-means on u [K, d] (identical on every rank) -> centroids [E, d]. Initial centroids:
// E distinct rows chosen by a shuffle from seed; an empty cluster keeps its centroid. Assignment
// ties go to the lowest id; sums in double, in row order: deterministic. Returns cluster sizes.
std::vector<int64_t> kmeans(ConstView u, int64_t E, int iters, uint64_t seed, Tensor& centroids) {
  const int64_t K = u.rows, d = u.cols;
  MOE_CHECK(K >= E, "kmeans: ", K, " points for ", E, " clusters");
  std::vector<int64_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed ^ kKmeansSeedSalt);
  for (int64_t i = K - 1; i > 0; --i)  // Fisher-Yates with our own index draw: portable
    std::swap(order[static_cast<size_t>(i)],
              order[static_cast<size_t>(rng() % static_cast<uint64_t>(i + 1))]);
  centroids = Tensor({E, d});
  View c = centroids.view();
  for (int64_t e = 0; e < E; ++e) std::copy_n(u.row(order[static_cast<size_t>(e)]), d, c.row(e));
  std::vector<int64_t> assign(static_cast<size_t>(K), 0), size(static_cast<size_t>(E), 0);
  std::vector<double> sum(static_cast<size_t>(E * d));
  for (int it = 0; it < iters; ++it) {
    for (int64_t i = 0; i < K; ++i) {
      double best = INFINITY;
      for (int64_t e = 0; e < E; ++e) {
        double dist = 0;
        for (int64_t j = 0; j < d; ++j) {
          const double x = double(u(i, j)) - c(e, j);
          dist += x * x;
        }
        if (dist < best) {
          best = dist;
          assign[static_cast<size_t>(i)] = e;
        }
      }
    }
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(size.begin(), size.end(), 0);
    for (int64_t i = 0; i < K; ++i) {
      const int64_t e = assign[static_cast<size_t>(i)];
      ++size[static_cast<size_t>(e)];
      for (int64_t j = 0; j < d; ++j) sum[static_cast<size_t>(e * d + j)] += u(i, j);
    }
    for (int64_t e = 0; e < E; ++e)
      if (size[static_cast<size_t>(e)] > 0)
        for (int64_t j = 0; j < d; ++j)
          c(e, j) = static_cast<float>(sum[static_cast<size_t>(e * d + j)] /
                                       double(size[static_cast<size_t>(e)]));
  }
  return size;
}

double kl_uniform(const std::vector<int64_t>& count) {
  double total = 0, kl = 0;
  for (int64_t v : count) total += double(v);
  if (!(total > 0)) return 0;
  for (int64_t v : count)
    if (v > 0) kl += (v / total) * std::log(v / total * double(count.size()));
  return kl;
}

}  // namespace

TrainSummary train_single_gate(const Config& config, const TrainOptions& options,
                               const comm::Communicator& comm) {
  const int rank = comm.rank(), P = comm.size();
  Run run = start_run(config, rank, P, "moe-train");
  const uint64_t seed = static_cast<uint64_t>(config.get_int("train.seed"));
  const int64_t G = config.get_int("train.global_batch"), m = config.get_int("train.micro_batch");
  const int64_t T = config.get_int("train.seq_len");
  if (G % (m * P) != 0)
    throw Error(ErrorKind::kConfig, cat("train.global_batch = ", G, " is not divisible by ",
                                        "train.micro_batch x ranks = ", m, " x ", P));
  const int64_t A = G / (m * P);
  const std::string data_path = config.get_string("data.path");

  std::unique_ptr<TokenDataset> train_data, val_data;
  std::unique_ptr<ModelConfig> mc;
  std::unique_ptr<SingleGateConfig> sg;
  std::string error;
  ErrorKind kind = ErrorKind::kData;
  try {
    TokenFileInfo info = read_token_file_info(data_path);
    kind = ErrorKind::kConfig;
    mc = std::make_unique<ModelConfig>(ModelConfig::from(config, info.vocab_size));
    sg = std::make_unique<SingleGateConfig>(SingleGateConfig::from(config, *mc));
    if (mc->moe.n_experts < P)
      throw Error(ErrorKind::kConfig,
                  cat("model.moe.num_experts = ", mc->moe.n_experts, " is below the ", P,
                      " ranks: single_gate gives every rank at least one whole expert"));
    kind = ErrorKind::kData;
    train_data = std::make_unique<TokenDataset>(data_path, config.get_string("data.split"), T,
                                                mc->vocab_size);
    val_data = std::make_unique<TokenDataset>(data_path, "val", T, mc->vocab_size);
  } catch (const Error& e) {
    error = e.message();
    kind = e.kind();
  }
  comm.agree(error, kind, "open data");

  const int64_t total_steps = config.get_int("train.steps");
  const int64_t E = mc->moe.n_experts;
  const int64_t a_end =
      sg->base_checkpoint.empty() ? std::llround(sg->base_fraction * double(total_steps)) : 0;
  const int64_t c_end = total_steps - std::llround(sg->gate_fraction * double(total_steps));
  if (c_end <= a_end)
    throw Error(ErrorKind::kConfig,
                cat("train.steps = ", total_steps, " leaves no step for the experts' phase ",
                    "(base ", a_end, ", gate ", total_steps - c_end, " steps)"));
  auto phase_of = [&](int64_t s) {
    return s < a_end ? Phase::kBase : (s < c_end ? Phase::kExperts : Phase::kGate);
  };
  auto phase_start = [&](Phase p) {
    return p == Phase::kBase ? int64_t(0) : (p == Phase::kExperts ? a_end : c_end);
  };
  auto phase_end = [&](Phase p) {
    return p == Phase::kBase ? a_end : (p == Phase::kExperts ? c_end : total_steps);
  };

  SingleGateModel model(*mc, *sg, comm, seed);
  const AdamWOptions ao = AdamWOptions::from(config);

  // The current phase's optimiser, gradient views and reducer.
  std::unique_ptr<AdamW> opt;
  std::unique_ptr<comm::GradientAllReducer> reducer;
  std::vector<ConstView> dense_cgrads, expert_cgrads;
  std::vector<View> all_grads;
  Phase phase = phase_of(0);
  auto enter_phase = [&](Phase p) {
    phase = p;
    opt = std::make_unique<AdamW>(ao);
    dense_cgrads.clear();
    expert_cgrads.clear();
    all_grads.clear();
    std::vector<View> dense_grads;
    for (const ParamRef& q : model.dense_params(p)) {
      opt->add(q, decays_by_default(q.name));
      dense_grads.push_back(q.grad);
      dense_cgrads.push_back(q.grad);
      all_grads.push_back(q.grad);
    }
    if (p == Phase::kExperts)
      for (const ParamRef& q : model.expert_params()) {
        opt->add(q, true);
        expert_cgrads.push_back(q.grad);
        all_grads.push_back(q.grad);
      }
    comm::AllReduceOptions ro;
    ro.bucket_bytes = static_cast<int64_t>(config.get_float("comm.bucket_mb") * (1 << 20));
    ro.average = false;  // the loss is already normalised by the global count
    reducer = std::make_unique<comm::GradientAllReducer>(comm, dense_grads, ro);
  };

  // Checkpoint entries: every tensor; the current optimiser's moments where it has them.
  auto tensor_entry = [&](const std::string& name, const std::string& opt_name, View value,
                          bool with_state) {
    checkpoint::TensorEntry t{name, value, {}, {}, nullptr};
    const int64_t i = with_state && opt ? opt->find(opt_name) : -1;
    if (i >= 0) {
      AdamState& st = opt->state(static_cast<size_t>(i));
      t.adam_m = st.m.view();
      t.adam_v = st.v.view();
      t.adam_step = &st.step;
    }
    return t;
  };
  auto dense_entries = [&](bool with_state) {
    std::vector<checkpoint::TensorEntry> out;
    for (const ParamRef& q : model.all_dense_params())
      out.push_back(tensor_entry(q.name, q.name, q.value, with_state));
    return out;
  };
  auto expert_entries = [&](bool with_state) {
    std::vector<checkpoint::ExpertEntry> out;
    for (auto& [gid, ps] : model.expert_groups()) {
      checkpoint::ExpertEntry x;
      x.layer = sg->shared_layers;  // the whole expert: blocks [L_s, L) and the final norm
      x.expert = gid;
      const std::string prefix = cat("experts.", gid, ".");
      for (const ParamRef& q : ps)
        x.tensors.push_back(
            tensor_entry(q.name.substr(prefix.size()), q.name, q.value, with_state));
      out.push_back(std::move(x));
    }
    return out;
  };
  TrainLoop loop(config, run.dir, comm);

  int64_t start_step = 0;
  if (!options.resume.empty()) {
    // Inside a phase its optimiser's moments come back too; at a phase start they begin fresh.
    // The values first (that also gives the step), then the moments when inside a phase.
    const checkpoint::Metadata peek =
        checkpoint::load(options.resume, dense_entries(false), expert_entries(false), comm);
    start_step = peek.step;
    enter_phase(phase_of(std::min(start_step, total_steps - 1)));
    if (start_step > phase_start(phase))
      checkpoint::load(options.resume, dense_entries(true), expert_entries(true), comm);
    log::info0("resumed from ", options.resume, " at step ", start_step, " (written by ",
               peek.world_size, " rank(s), now ", P, ")");
  } else {
    enter_phase(phase);
    if (!sg->base_checkpoint.empty()) {
      // A dense Transformer's names; the base branch's own tensors when the file has them.
      std::vector<checkpoint::TensorEntry> base;
      for (const ParamRef& q : model.base_model_params())
        base.push_back({q.name, q.value, {}, {}, nullptr});
      // A single_gate checkpoint also holds experts, which the loader wants taken (they are
      // replaced by phase (b) anyway); a dense Transformer's holds none.
      checkpoint::Metadata meta;
      try {
        meta = checkpoint::load(sg->base_checkpoint, base, expert_entries(false), comm);
      } catch (const Error&) {  // collective: every rank throws alike
        meta = checkpoint::load(sg->base_checkpoint, base, {}, comm);
      }
      std::vector<checkpoint::TensorEntry> branch;
      for (const ParamRef& q : model.base_branch_params())
        branch.push_back({q.name, q.value, {}, {}, nullptr});
      try {
        checkpoint::load(sg->base_checkpoint, branch, {}, comm);
      } catch (const Error&) {  // collective: every rank throws alike
        log::info0("base checkpoint has no base branch (base_norm, base_head): starting it fresh");
      }
      log::info0("base model from ", sg->base_checkpoint, " (step ", meta.step, ")");
    }
  }
  const int64_t end_step =
      options.stop_after > 0 ? std::min(total_steps, start_step + options.stop_after) : total_steps;

  loop.begin(options, start_step, end_step, total_steps);
  const int64_t eval_batches = loop.eval_batches();
  std::vector<int32_t> windows(static_cast<size_t>(m * (T + 1)));

  auto evaluate = [&](Phase p, double& exited) {
    const double norm = static_cast<double>(eval_batches * G * T);
    double local = 0, out = 0;
    for (int64_t b = 0; b < eval_batches; ++b)
      for (int64_t j = 0; j < A; ++j) {
        val_data->read_windows(seed ^ kEvalSeedSalt, b, j * m * P + rank * m, m, windows.data());
        if (p == Phase::kBase) {
          local += model.forward(Phase::kBase, windows, m, T, norm);
        } else {
          local += model.score(windows, m, T, norm);
          out += static_cast<double>(model.stats().exited);
        }
      }
    exited = comm.sum(out, "eval exits") / static_cast<double>(eval_batches * G);
    return comm.sum(local, "eval loss");
  };

  // Phase (b): K-means on K pooled training sequences, rank r pooling its contiguous share.
  auto init_experts = [&] {
    const int64_t K = std::max(sg->kmeans_sequences, E), d = mc->d_model;
    const int64_t first = rank * K / P, count = (rank + 1) * K / P - first;
    Tensor u = Tensor::zeros({K, d});
    std::vector<int32_t> w(static_cast<size_t>(count * (T + 1)));
    if (count > 0) {
      train_data->read_windows(seed ^ kKmeansSeedSalt, 0, first, count, w.data());
      copy(model.pool(w, count, T), u.view().row_range(first, count));
    }
    comm.allreduce_sum(u.data(), K * d, "kmeans features");
    Tensor centroids;
    const std::vector<int64_t> sizes = kmeans(u.view(), E, sg->kmeans_iters, seed, centroids);
    model.set_gate_from_centroids(centroids.view());
    model.copy_base_into_experts();
    std::string s;
    for (int64_t v : sizes) s += cat(s.empty() ? "" : " ", v);
    log::info0("single_gate phase (b): K-means on ", K, " sequences, cluster sizes [", s, "]");
  };

  std::vector<int64_t> last_used(static_cast<size_t>(E), -1);
  for (int64_t s = start_step; s < end_step; ++s) {
    if (phase_of(s) != phase) enter_phase(phase_of(s));
    if (s == a_end && phase == Phase::kExperts) init_experts();
    const double t0 = now_s();
    model.zero_grad();
    const double norm = phase == Phase::kGate ? double(G) : double(G * T);
    double loss_local = 0, imbalance = 0, gate_acc = 0;
    std::vector<int64_t> counts(static_cast<size_t>(E), 0);
    for (int64_t j = 0; j < A; ++j) {
      train_data->read_windows(seed, s, j * m * P + rank * m, m, windows.data());
      loss_local += model.forward(phase, windows, m, T, norm);
      model.backward();
      const SingleGateStats& st = model.stats();
      imbalance = std::max(imbalance, st.expert_imbalance);
      gate_acc += st.gate_accuracy / double(A);
      if (phase == Phase::kExperts)
        for (int64_t e = 0; e < E; ++e) counts[static_cast<size_t>(e)] += st.expert_sequences[e];
    }
    reducer->all_reduce();
    const double loss = comm.sum(loss_local, "loss");
    const double gnorm = comm::global_grad_norm(dense_cgrads, expert_cgrads, comm);
    LrSchedule sched;
    sched.lr = config.get_float("train.lr");
    sched.min_lr = config.get_float("train.min_lr");
    sched.total_steps = phase_end(phase) - phase_start(phase);
    sched.warmup_steps = std::min(config.get_int("train.warmup_steps"), sched.total_steps / 4);
    const double lr = sched.at(s - phase_start(phase));
    const bool skipped = !step_is_finite(s, loss, gnorm, loop.skip_nonfinite());
    if (skipped) {
      loop.skip_step();
    } else {
      clip_grad_norm(all_grads, gnorm, config.get_float("train.grad_clip"));
      opt->step(lr);
    }
    int64_t dead = 0;
    if (phase != Phase::kBase)
      for (int64_t e = 0; e < E; ++e) {
        if (phase == Phase::kGate || counts[static_cast<size_t>(e)] > 0)
          last_used[static_cast<size_t>(e)] = s;  // kGate: every expert sees every sequence
        dead += last_used[static_cast<size_t>(e)] < 0 ||
                s - last_used[static_cast<size_t>(e)] >= kDeadWindow;
      }
    const double dt = now_s() - t0;
    loop.count_step(dt, double(G * T));
    nlohmann::json rec = {{"step", s + 1},        {"phase", phase_name(phase)},
                          {"loss", loss},         {"lr", lr},
                          {"grad_norm", gnorm},   {"tokens_per_s", double(G * T) / dt},
                          {"step_seconds", dt},   {"expert_imbalance", imbalance},
                          {"dead_experts", dead}, {"router_kl", kl_uniform(counts)}};
    if (phase == Phase::kGate) rec["gate_accuracy"] = gate_acc;
    if (skipped) rec["skipped"] = true;
    if (loop.eval_due(s)) {
      double exited = 0;
      rec["val_loss"] = evaluate(phase, exited);
      rec["val_exited"] = exited;
    }
    loop.report(s, loss, rec, [&](double eta) {
      std::string line = format_progress(s + 1, total_steps, loss, 0.0, double(G * T) / dt, eta);
      line += cat(" | ", phase_name(phase));
      if (rec.contains("val_loss")) line += cat(" | val ", rec["val_loss"].get<double>());
      return line;
    });
    if (loop.checkpoint_or_stop(s, [&] {
          return CheckpointEntries{dense_entries(true), expert_entries(true)};
        }))
      break;
  }
  nlohmann::json done = loop.finish();
  const TrainSummary& summary = loop.summary();
  done["router"] = "single_gate";
  done["phases"] = {{"base", a_end}, {"experts", c_end - a_end}, {"gate", total_steps - c_end}};
  int64_t dead = 0;
  for (int64_t v : last_used) dead += v < 0 || summary.last_step - 1 - v >= kDeadWindow;
  done["dead_experts"] = a_end >= summary.last_step ? 0 : dead;
  loop.write_summary(done);
  return summary;
}

}  // namespace moe::model
