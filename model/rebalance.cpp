#include "model/rebalance.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
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

void get(View v, const float* src) {
  for (int64_t r = 0; r < v.rows; ++r)
    std::memcpy(v.row(r), src + r * v.cols, static_cast<size_t>(v.cols) * sizeof(float));
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
  return c;
}

ExpertRebalancer::ExpertRebalancer(const RebalanceConfig& config, Transformer& model,
                                   const comm::Communicator& comm)
    : config_(config),
      comm_(comm),
      tracker_(model.config().n_moe_layers(), model.config().moe.n_experts, config.ema_decay) {
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

const RebalanceEvent& ExpertRebalancer::apply(int64_t step, Transformer& model, AdamW& expert_opt,
                                              const std::vector<comm::ExpertPlacement>& next) {
  MOE_CHECK(next.size() == blocks_.size(), "rebalance: ", next.size(), " placements for ",
            blocks_.size(), " MoE layers");
  const double t0 = now_s();
  const int me = comm_.rank();
  RebalanceEvent ev;
  ev.step = step;

  // Migrate layer by layer; keep each layer's received rows until the optimiser is rebuilt.
  std::vector<std::vector<float>> received(blocks_.size());
  std::unordered_map<std::string, std::pair<const float*, int>> state;  // name -> (row, w1/w2)
  RowLayout lay{0, 0};
  int64_t staged = 0, sent = 0, moved = 0, old_peak = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (next[i] == placement_[i]) continue;
    ++ev.layers_changed;
    const comm::ExpertPlacement& from = placement_[i];
    const comm::ExpertPlacement& to = next[i];
    MoeLayer& layer = *model.moe_layer(blocks_[i]);
    ExpertBank& bank = layer.experts();
    lay = layout_of(bank);
    const int64_t F = lay.floats();
    const std::string prefix = cat("blocks.", blocks_[i], ".moe.expert.");
    std::vector<float> old_rows(static_cast<size_t>(bank.n_local() * F));
    for (int j = 0; j < bank.n_local(); ++j) {
      float* row = old_rows.data() + j * F;
      const std::string p = cat(prefix, bank.global_ids()[static_cast<size_t>(j)], ".");
      const int64_t i1 = expert_opt.find(p + "w1"), i2 = expert_opt.find(p + "w2");
      MOE_CHECK(i1 >= 0 && i2 >= 0, "rebalance: optimiser lacks ", p, "w1/w2");
      AdamState& s1 = expert_opt.state(static_cast<size_t>(i1));
      AdamState& s2 = expert_opt.state(static_cast<size_t>(i2));
      put(row + lay.w1(), bank.w1(j));
      put(row + lay.w2(), bank.w2(j));
      put(row + lay.m1(), s1.m.view());
      put(row + lay.v1(), s1.v.view());
      put(row + lay.m2(), s2.m.view());
      put(row + lay.v2(), s2.v.view());
      std::memcpy(row + lay.t1(), &s1.step, sizeof(int64_t));
      std::memcpy(row + lay.t2(), &s2.step, sizeof(int64_t));
    }
    std::vector<float>& new_rows = received[i];
    new_rows.resize(static_cast<size_t>(to.n_local(me) * F));
    const comm::MigrationStats ms =
        comm::migrate_experts(from, to, F, old_rows.data(), new_rows.data(), comm_);
    sent += ms.bytes_sent;
    moved += ms.experts_received;
    staged += static_cast<int64_t>(new_rows.size()) * 4;
    old_peak = std::max<int64_t>(old_peak, static_cast<int64_t>(old_rows.size()) * 4);

    auto next = std::make_unique<ExpertBank>(bank.d_model(), bank.d_ff(), bank.activation(),
                                             to.local_experts(me), 0);
    std::vector<uint8_t> replica(static_cast<size_t>(next->n_local()), 0);
    for (int j = 0; j < next->n_local(); ++j) {
      const int g = to.local_experts(me)[static_cast<size_t>(j)];
      const float* row = new_rows.data() + j * F;
      get(next->w1(j), row + lay.w1());
      get(next->w2(j), row + lay.w2());
      replica[static_cast<size_t>(j)] = to.owner(g) != me;
      state[cat(prefix, g, ".w1")] = {row, 1};
      state[cat(prefix, g, ".w2")] = {row, 2};
    }
    next->set_replicas(std::move(replica));
    layer.replace_experts(to, std::move(next));
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

  // The optimiser over the new expert parameters: migrated state from the rows, the rest
  // (PEER tables, unchanged layers) moved over from the old optimiser.
  model.refresh_params();
  AdamW next_opt(expert_opt.options());
  for (const ParamRef& p : model.expert_params()) {
    const size_t k = next_opt.add(p, true);
    AdamState& dst = next_opt.state(k);
    auto it = state.find(p.name);
    if (it != state.end()) {
      const float* row = it->second.first;
      const bool w1 = it->second.second == 1;
      get(dst.m.view(), row + (w1 ? lay.m1() : lay.m2()));
      get(dst.v.view(), row + (w1 ? lay.v1() : lay.v2()));
      std::memcpy(&dst.step, row + (w1 ? lay.t1() : lay.t2()), sizeof(int64_t));
    } else {
      const int64_t old = expert_opt.find(p.name);
      MOE_CHECK(old >= 0, "rebalance: optimiser lacks ", p.name);
      AdamState& src = expert_opt.state(static_cast<size_t>(old));
      dst.m = std::move(src.m);
      dst.v = std::move(src.v);
      dst.step = src.step;
    }
  }
  expert_opt = std::move(next_opt);

  ev.experts_moved = static_cast<int>(comm_.sum(static_cast<int64_t>(moved), "rebalance moved"));
  ev.bytes_moved = comm_.sum(sent, "rebalance bytes");
  ev.replicas = replicas();
  ev.peak_extra_mb =
      comm_.max(static_cast<double>(staged + old_peak) / (1024.0 * 1024.0), "rebalance memory");
  ev.seconds = comm_.max(now_s() - t0, "rebalance time");
  event_ = ev;
  ++rebalances_;
  return event_;
}

}  // namespace moe::model
