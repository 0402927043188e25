#include "model/rebalance.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <tuple>
#include <unordered_map>

#include "model/layers/moe_layer.hpp"
#include "model/layers/umoe_attention.hpp"

namespace moe::model {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Offsets of one expert's state in a migration row: [w1 | w2 | m1 | v1 | m2 | v2 | t1 | t2],
// each step counter t an int64 carried as two floats' worth of bytes.
struct RowLayout {
  int64_t n1, n2;
  int64_t w1() const { return 0; }
  int64_t w2() const { return n1; }
  int64_t m1() const { return n1 + n2; }
  int64_t v1() const { return 2 * n1 + n2; }
  int64_t m2() const { return 3 * n1 + n2; }
  int64_t v2() const { return 3 * n1 + 2 * n2; }
  int64_t t1() const { return 3 * n1 + 3 * n2; }
  int64_t t2() const { return t1() + 2; }
  int64_t floats() const { return t2() + 2; }
};

RowLayout layout_of(const ExpertBank& bank) {
  const int64_t f1 = bank.activation() == Activation::kSwiglu ? 2 * bank.d_ff() : bank.d_ff();
  return {bank.d_model() * f1, bank.d_ff() * bank.d_model()};
}

void put(float* dst, ConstView v) {
  for (int64_t r = 0; r < v.rows; ++r)
    std::memcpy(dst + r * v.cols, v.row(r), static_cast<size_t>(v.cols) * sizeof(float));
}

void copy_rows(View dst, ConstView src) {
  for (int64_t r = 0; r < src.rows; ++r)
    std::memcpy(dst.row(r), src.row(r), static_cast<size_t>(src.cols) * sizeof(float));
}

void get(View v, const float* src) {
  for (int64_t r = 0; r < v.rows; ++r)
    std::memcpy(v.row(r), src + r * v.cols, static_cast<size_t>(v.cols) * sizeof(float));
}

// A bank like `like` for rank me's instances under `to`, replicas marked; its weights are to be
// filled (migrated or loaded).
std::unique_ptr<ExpertBank> bank_for(const ExpertBank& like, const comm::ExpertPlacement& to,
                                     int me) {
  auto nb = std::make_unique<ExpertBank>(like.d_model(), like.d_ff(), like.activation(),
                                         to.local_experts(me), 0);
  std::vector<uint8_t> replica(static_cast<size_t>(nb->n_local()), 0);
  for (int j = 0; j < nb->n_local(); ++j)
    replica[static_cast<size_t>(j)] = to.owner(to.local_experts(me)[static_cast<size_t>(j)]) != me;
  nb->set_replicas(std::move(replica));
  return nb;
}

// Each MoE block's expert count (blocks may differ: model.moe.layer_experts).
std::vector<int> layer_expert_counts(const Transformer& model) {
  std::vector<int> n;
  for (const MoeLayer* m : model.moe_layers()) n.push_back(m->placement().n_experts());
  return n;
}
}  // namespace

int64_t expert_state_floats(const ExpertBank& bank) {
  return layout_of(bank).floats();
}

RebalanceConfig RebalanceConfig::from(const Config& config) {
  RebalanceConfig c;
  c.every = config.get_int("comm.rebalance.every");
  c.ema_decay = config.get_float("comm.rebalance.ema_decay");
  c.plan.replicas = static_cast<int>(config.get_int("comm.rebalance.replicas"));
  c.plan.policy = comm::parse_rebalance_policy(config.get_string("comm.rebalance.policy"));
  c.plan.min_gain = config.get_float("comm.rebalance.min_gain");
  c.plan.max_experts_per_rank =
      static_cast<int>(config.get_int("comm.rebalance.max_experts_per_rank"));
  return c;
}

ExpertRebalancer::ExpertRebalancer(const RebalanceConfig& config, Transformer& model,
                                   const comm::Communicator& comm)
    : config_(config), comm_(comm), tracker_(layer_expert_counts(model), config.ema_decay) {
  const ModelConfig& mc = model.config();
  for (int l = 0; l < mc.n_layers; ++l) {
    if (model.umoe_attention(l))
      throw Error(ErrorKind::kConfig,
                  "comm.rebalance.every > 0 does not support UMoE attention experts "
                  "(model.attention = umoe); set comm.rebalance.every to 0");
    MoeLayer* m = model.moe_layer(l);
    if (!m) continue;
    MOE_CHECK(m->owns_experts(), "rebalance: block ", l, " borrows its experts");
    if (config.plan.replicas > 0 &&
        (m->config().pipeline_chunks > 1 || m->config().capacity_factor > 0.0))
      throw Error(ErrorKind::kConfig,
                  cat("comm.rebalance.replicas = ", config.plan.replicas,
                      " needs model.moe.pipeline_chunks 1 and model.moe.capacity_factor 0 (have ",
                      m->config().pipeline_chunks, " and ", m->config().capacity_factor,
                      "); set comm.rebalance.replicas to 0 to re-place experts without replicas"));
    // (the same on every rank: each raises it before the first rebalancing collective)
    comm::check_expert_cap(config.plan, m->placement().n_experts(), comm.size());
    blocks_.push_back(l);
    placement_.push_back(m->placement());
    groups_.emplace_back();
  }
}

void ExpertRebalancer::observe(const Transformer& model) {
  const std::vector<const MoeLayer*> layers = model.moe_layers();
  for (size_t i = 0; i < layers.size(); ++i)
    tracker_.add(static_cast<int>(i), layers[i]->stats().load.expert_tokens);
}

void ExpertRebalancer::sum_replica_grads(Transformer& model) {
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (!placement_[i].has_replicas()) continue;
    ExpertBank& bank = model.moe_layer(blocks_[i])->experts();
    for (int j = 0; j < bank.n_local(); ++j) {  // slots in increasing global id
      const int g = bank.global_ids()[static_cast<size_t>(j)];
      if (!groups_[i].member(g)) continue;
      groups_[i].sum(g, bank.dw1(j).data, bank.dw1(j).size(), "replica gradient sum (w1)");
      groups_[i].sum(g, bank.dw2(j).data, bank.dw2(j).size(), "replica gradient sum (w2)");
    }
  }
}

double ExpertRebalancer::predicted_imbalance() const {
  std::vector<double> total(static_cast<size_t>(comm_.size()), 0.0);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const std::vector<double> r =
        comm::rank_loads(tracker_.load(static_cast<int>(i)), placement_[i]);
    for (size_t q = 0; q < r.size(); ++q) total[q] += r[q];
  }
  double sum = 0, mx = 0;
  for (double v : total) sum += v, mx = std::max(mx, v);
  return sum > 0 ? mx * static_cast<double>(total.size()) / sum : 0.0;
}

int ExpertRebalancer::replicas() const {
  int n = 0;
  for (const auto& p : placement_) n += p.n_replicas();
  return n;
}

bool ExpertRebalancer::end_step(int64_t s, Transformer& model, AdamW& expert_opt) {
  tracker_.end_step();
  if (!config_.enabled() || (s + 1) % config_.every != 0 || blocks_.empty()) return false;
  std::vector<comm::PlacementPlan> plans;
  bool any = false;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    plans.push_back(
        comm::plan_placement(tracker_.load(static_cast<int>(i)), placement_[i], config_.plan));
    any |= plans.back().changed;
  }
  if (!any) return false;
  std::vector<comm::ExpertPlacement> next;
  for (const comm::PlacementPlan& p : plans) next.push_back(p.placement);
  apply(s + 1, model, expert_opt, next);
  double max_before = 0, max_after = 0;
  for (const comm::PlacementPlan& p : plans) {
    max_before += p.max_before;
    max_after += p.max_after;
    event_.imbalance_before = std::max(event_.imbalance_before, p.imbalance_before);
    event_.imbalance_after = std::max(event_.imbalance_after, p.imbalance_after);
  }
  event_.predicted_gain = max_after > 0 ? max_before / max_after : 1.0;
  return true;
}

std::pair<int, int> ExpertRebalancer::max_instances() const {
  std::pair<int, int> most{0, 0};
  double worst = -1;
  for (const comm::ExpertPlacement& p : placement_) {
    const int n = comm::max_instances(p),
              cap = comm::expert_cap(config_.plan, p.n_experts(), p.n_ranks());
    if (static_cast<double>(n) / cap > worst) worst = static_cast<double>(n) / cap, most = {n, cap};
  }
  return most;
}

const RebalanceEvent& ExpertRebalancer::apply(int64_t step, Transformer& model, AdamW& expert_opt,
                                              const std::vector<comm::ExpertPlacement>& next) {
  MOE_CHECK(next.size() == blocks_.size(), "rebalance: ", next.size(), " placements for ",
            blocks_.size(), " MoE layers");
  const double t0 = now_s();
  const int me = comm_.rank();
  RebalanceEvent ev;
  ev.step = step;

  // Migrate layer by layer; keep each layer's received rows until the optimiser is rebuilt.
  // Migrate layer by layer, staging only the experts that move. AdamW states of the new expert
  // parameters, by name: moved over from the old optimiser (kept experts) or rebuilt from the
  // received rows; unchanged layers and PEER tables keep theirs (below).
  std::unordered_map<std::string, AdamState> states;
  int64_t staged = 0, sent = 0, moved = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (next[i] == placement_[i]) continue;
    ++ev.layers_changed;
    const comm::ExpertPlacement& from = placement_[i];
    const comm::ExpertPlacement& to = next[i];
    MoeLayer& layer = *model.moe_layer(blocks_[i]);
    ExpertBank& bank = layer.experts();
    const RowLayout lay = layout_of(bank);
    const int64_t F = lay.floats();
    const std::string prefix = cat("blocks.", blocks_[i], ".moe.expert.");
    auto state_of = [&](int g, const char* w) -> AdamState& {
      const int64_t k = expert_opt.find(cat(prefix, g, ".", w));
      MOE_CHECK(k >= 0, "rebalance: optimiser lacks ", prefix, g, ".", w);
      return expert_opt.state(static_cast<size_t>(k));
    };
    const comm::MigrationPlan mp = comm::plan_migration(from, to, me);
    std::vector<float> send_rows(mp.sends.size() * static_cast<size_t>(F));
    for (size_t k = 0; k < mp.sends.size(); ++k) {
      const auto& sd = mp.sends[k];
      float* row = send_rows.data() + k * static_cast<size_t>(F);
      AdamState &s1 = state_of(sd.expert, "w1"), &s2 = state_of(sd.expert, "w2");
      put(row + lay.w1(), bank.w1(sd.old_slot));
      put(row + lay.w2(), bank.w2(sd.old_slot));
      put(row + lay.m1(), s1.m.view());
      put(row + lay.v1(), s1.v.view());
      put(row + lay.m2(), s2.m.view());
      put(row + lay.v2(), s2.v.view());
      std::memcpy(row + lay.t1(), &s1.step, sizeof(int64_t));
      std::memcpy(row + lay.t2(), &s2.step, sizeof(int64_t));
    }
    std::vector<float> recv_rows(mp.recvs.size() * static_cast<size_t>(F));
    const comm::MigrationStats ms =
        comm::migrate_experts(mp, F, send_rows.data(), recv_rows.data(), comm_);
    sent += ms.bytes_sent;
    moved += ms.experts_received;
    staged =
        std::max<int64_t>(staged, static_cast<int64_t>(send_rows.size() + recv_rows.size()) * 4);
    std::vector<float>().swap(send_rows);

    std::unique_ptr<ExpertBank> nb = bank_for(bank, to, me);
    for (const auto& kp : mp.keeps) {
      copy_rows(nb->w1(kp.new_slot), bank.w1(kp.old_slot));
      copy_rows(nb->w2(kp.new_slot), bank.w2(kp.old_slot));
      for (const char* w : {"w1", "w2"}) {
        AdamState& src = state_of(kp.expert, w);
        AdamState& dst = states[cat(prefix, kp.expert, ".", w)];
        dst.m = std::move(src.m);
        dst.v = std::move(src.v);
        dst.step = src.step;
      }
    }
    for (size_t k = 0; k < mp.recvs.size(); ++k) {
      const auto& rv = mp.recvs[k];
      const float* row = recv_rows.data() + k * static_cast<size_t>(F);
      get(nb->w1(rv.new_slot), row + lay.w1());
      get(nb->w2(rv.new_slot), row + lay.w2());
      for (int w = 1; w <= 2; ++w) {
        const View shape = w == 1 ? nb->w1(rv.new_slot) : nb->w2(rv.new_slot);
        AdamState& dst = states[cat(prefix, rv.expert, w == 1 ? ".w1" : ".w2")];
        dst.m = Tensor({shape.rows, shape.cols});
        dst.v = Tensor({shape.rows, shape.cols});
        get(dst.m.view(), row + (w == 1 ? lay.m1() : lay.m2()));
        get(dst.v.view(), row + (w == 1 ? lay.v1() : lay.v2()));
        std::memcpy(&dst.step, row + (w == 1 ? lay.t1() : lay.t2()), sizeof(int64_t));
      }
    }
    layer.replace_experts(to, std::move(nb));  // the old bank is freed here
    groups_[i] = comm::ReplicaGroups(to, comm_);

    // What moved: every new instance on a rank that did not hold the expert.
    std::string what;
    for (int g = 0; g < to.n_experts(); ++g)
      for (int r : to.instances(g))
        if (from.slot_on(g, r) < 0)
          what += cat(what.empty() ? "" : ", ", g, to.owner(g) == r ? "" : "'", " r", from.owner(g),
                      "->r", r);
    ev.moves += cat(ev.moves.empty() ? "" : "; ", "L", blocks_[i], ": ",
                    what.empty() ? "replicas dropped" : what);
    placement_[i] = to;
  }

  // The optimiser over the new expert parameters.
  model.refresh_params();
  AdamW next_opt(expert_opt.options());
  for (const ParamRef& p : model.expert_params()) {
    auto it = states.find(p.name);
    if (it != states.end()) {
      next_opt.add(p, true, std::move(it->second));
      continue;
    }
    const int64_t old = expert_opt.find(p.name);
    MOE_CHECK(old >= 0, "rebalance: optimiser lacks ", p.name);
    AdamState& src = expert_opt.state(static_cast<size_t>(old));
    AdamState st;
    st.m = std::move(src.m);
    st.v = std::move(src.v);
    st.step = src.step;
    next_opt.add(p, expert_opt.decay(static_cast<size_t>(old)), std::move(st));
  }
  expert_opt = std::move(next_opt);

  ev.experts_moved = static_cast<int>(comm_.sum(static_cast<int64_t>(moved), "rebalance moved"));
  ev.bytes_moved = comm_.sum(sent, "rebalance bytes");
  ev.replicas = replicas();
  std::tie(ev.max_instances, ev.cap) = max_instances();
  ev.peak_extra_mb = comm_.max(static_cast<double>(staged) / (1024.0 * 1024.0), "rebalance memory");
  ev.seconds = comm_.max(now_s() - t0, "rebalance time");
  event_ = ev;
  ++rebalances_;
  return event_;
}

namespace {
constexpr int64_t kStateVersion = 1;  // of the "rebalance.*" arrays
}  // namespace

bool ExpertRebalancer::saved(const checkpoint::StateArrays& state) {
  return state.ints.count("rebalance.version") > 0;
}

void ExpertRebalancer::save_state(checkpoint::StateArrays& out) const {
  out.ints["rebalance.version"] = {kStateVersion};
  out.ints["rebalance.world_size"] = {comm_.size()};
  out.ints["rebalance.blocks"] = std::vector<int64_t>(blocks_.begin(), blocks_.end());
  out.ints["rebalance.tracker_steps"] = {tracker_.steps()};
  out.ints["rebalance.rebalances"] = {rebalances_};
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const comm::ExpertPlacement& p = placement_[i];
    std::vector<int64_t> counts, ranks;
    for (int e = 0; e < p.n_experts(); ++e) {
      counts.push_back(p.n_instances(e));
      for (int r : p.instances(e)) ranks.push_back(r);
    }
    const std::string layer = cat("rebalance.layer", blocks_[i], ".");
    out.ints[layer + "instance_counts"] = std::move(counts);  // [E]
    out.ints[layer + "instance_ranks"] = std::move(ranks);    // primary first, expert by expert
    out.reals[layer + "load"] = tracker_.load(static_cast<int>(i));  // [E]
  }
}

std::string ExpertRebalancer::restore(const checkpoint::StateArrays& state, Transformer& model,
                                      AdamW& expert_opt) {
  if (!saved(state)) return "the checkpoint holds no expert placement";
  auto ints = [&](const std::string& name) -> const std::vector<int64_t>* {
    auto it = state.ints.find(name);
    return it == state.ints.end() ? nullptr : &it->second;
  };
  auto one = [&](const std::string& name) -> int64_t {
    const std::vector<int64_t>* v = ints(name);
    return v && v->size() == 1 ? (*v)[0] : -1;
  };
  if (one("rebalance.version") != kStateVersion)
    return cat("its rebalancing state has version ", one("rebalance.version"),
               ", this build reads ", kStateVersion);
  const int P = comm_.size();
  if (one("rebalance.world_size") != P)
    return cat("it was written by ", one("rebalance.world_size"), " rank(s), this run has ", P);
  const std::vector<int64_t> blocks(blocks_.begin(), blocks_.end());
  if (!ints("rebalance.blocks") || *ints("rebalance.blocks") != blocks)
    return "its MoE blocks differ from this model's";
  std::vector<comm::ExpertPlacement> next;
  std::vector<std::vector<double>> loads;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const std::string layer = cat("rebalance.layer", blocks_[i], ".");
    const std::vector<int64_t>* counts = ints(layer + "instance_counts");
    const std::vector<int64_t>* ranks = ints(layer + "instance_ranks");
    const auto load = state.reals.find(layer + "load");
    const size_t E = static_cast<size_t>(placement_[i].n_experts());
    if (!counts || !ranks || load == state.reals.end() || counts->size() != E ||
        load->second.size() != E)
      return cat("its placement of block ", blocks_[i], " is incomplete or not of ", E, " experts");
    std::vector<std::vector<int>> inst(E);
    size_t k = 0;
    for (size_t e = 0; e < E; ++e)
      for (int64_t c = 0; c < (*counts)[e] && k < ranks->size(); ++c)
        inst[e].push_back(static_cast<int>((*ranks)[k++]));
    if (k != ranks->size()) return cat("its placement of block ", blocks_[i], " is malformed");
    try {
      next.push_back(comm::ExpertPlacement::from_instances(inst, P));
    } catch (const Error& e) {
      return cat("its placement of block ", blocks_[i], " is invalid (", e.message(), ")");
    }
    if (next.back().has_replicas()) {
      const MoeConfig& mc = model.moe_layer(blocks_[i])->config();
      if (mc.pipeline_chunks > 1 || mc.capacity_factor > 0.0)
        return "it has replicas, which need model.moe.pipeline_chunks 1 and capacity_factor 0";
    }
    loads.push_back(load->second);
  }

  const int me = comm_.rank();
  bool any = false;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (next[i] == placement_[i]) continue;
    any = true;
    MoeLayer& layer = *model.moe_layer(blocks_[i]);
    layer.replace_experts(next[i], bank_for(layer.experts(), next[i], me));
    groups_[i] = comm::ReplicaGroups(next[i], comm_);
    placement_[i] = next[i];
  }
  if (any) {  // zero state over the new expert parameters; the checkpoint fills it
    model.refresh_params();
    AdamW fresh(expert_opt.options());
    for (const ParamRef& p : model.expert_params()) fresh.add(p, true);
    expert_opt = std::move(fresh);
  }
  tracker_.restore(std::move(loads), one("rebalance.tracker_steps"));
  rebalances_ = one("rebalance.rebalances");
  return "";
}

}  // namespace moe::model
