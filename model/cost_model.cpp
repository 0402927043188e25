#include "model/cost_model.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "comm/rebalance.hpp"
#include "runtime/error.hpp"

namespace moe::model {

void GemmRates::add(int64_t m, int64_t k, int64_t n, double gflops) {
  MOE_CHECK(gflops > 0, cat("GemmRates: GFLOP/s must be positive, got ", gflops));
  shapes_.push_back({m, k, n, gflops});
}

bool GemmRates::has(int64_t m, int64_t k, int64_t n) const {
  return std::any_of(shapes_.begin(), shapes_.end(),
                     [&](const Shape& s) { return s.m == m && s.k == k && s.n == n; });
}

double GemmRates::gflops(int64_t m, int64_t k, int64_t n) const {
  if (shapes_.empty()) return constant_;
  // Nearest measured shape in log space: GEMM efficiency follows the orders of magnitude of
  // the three sizes, not their differences.
  auto lg = [](int64_t x) { return std::log(static_cast<double>(std::max<int64_t>(x, 1))); };
  double best = std::numeric_limits<double>::infinity(), rate = constant_;
  for (const Shape& s : shapes_) {
    const double dm = lg(s.m) - lg(m), dk = lg(s.k) - lg(k), dn = lg(s.n) - lg(n);
    const double dist = dm * dm + dk * dk + dn * dn;
    if (dist < best) {
      best = dist;
      rate = s.gflops;
    }
  }
  return rate;
}

int64_t alltoall_flat_messages(int nodes, int rpn) {
  return static_cast<int64_t>(nodes) * rpn - 1;
}

int64_t alltoall_hier_messages(int nodes, int /*rpn*/) {
  return nodes - 1;
}

double alltoall_flat_seconds(const NetworkParams& net, int nodes, int rpn, double bytes) {
  const double P = static_cast<double>(nodes) * rpn, R = rpn;
  const double intra = (R - 1) * net.alpha_intra + bytes * (R - 1) / P / net.beta_intra;
  // The R ranks of a node share its link: R b (P-R)/P bytes leave the node.
  const double inter = (P - R) * net.alpha + R * bytes * (P - R) / P / net.beta;
  return intra + inter;
}

double alltoall_hier_seconds(const NetworkParams& net, int nodes, int rpn, double bytes) {
  const double N = nodes, R = rpn;
  const double gather = (R - 1) * net.alpha_intra + (R - 1) * bytes / net.beta_intra;
  const double leaders = (N - 1) * net.alpha + R * bytes * (N - 1) / N / net.beta;
  return 2 * gather + leaders;
}

double alltoall_hier2d_seconds(const NetworkParams& net, int nodes, int rpn, double bytes) {
  const double N = nodes, R = rpn;
  const double regroup = (R - 1) * net.alpha_intra + bytes * (R - 1) / R / net.beta_intra;
  const double inter = (N - 1) * net.alpha + R * bytes * (N - 1) / N / net.beta;
  return regroup + inter;
}

double allreduce_ring_seconds(const NetworkParams& net, int nodes, int rpn, double bytes) {
  const double P = static_cast<double>(nodes) * rpn;
  const bool across = nodes > 1;
  const double alpha = across ? net.alpha : net.alpha_intra;
  const double beta = across ? net.beta : net.beta_intra;
  return 2 * (P - 1) / P * bytes / beta + 2 * (P - 1) * alpha;
}

RebalancedLoad rebalanced_load_factor(double imbalance, int n_experts, int n_ranks, int replicas) {
  MOE_CHECK(n_experts >= n_ranks && n_ranks >= 1, "rebalanced_load_factor: ", n_experts,
            " experts over ", n_ranks, " ranks");
  const double E = n_experts, hot = std::clamp(imbalance, 1.0, E);
  std::vector<double> load(static_cast<size_t>(n_experts), E > 1 ? (E - hot) / (E - 1) : 1.0);
  load[0] = hot;
  comm::RebalanceOptions o;
  o.replicas = replicas;
  o.min_gain = 0.0;
  const comm::PlacementPlan plan =
      comm::plan_placement(load, comm::ExpertPlacement::blocked(n_experts, n_ranks), o);
  RebalancedLoad out;
  out.load = plan.imbalance_after > 0 ? plan.imbalance_after : 1.0;
  out.replicas = plan.placement.n_replicas();
  out.max_instances = comm::max_instances(plan.placement);
  out.rank_groups.assign(static_cast<size_t>(n_ranks), 0);
  for (int e = 0; e < n_experts; ++e)
    if (plan.placement.n_instances(e) > 1) {
      out.group_sizes.push_back(plan.placement.n_instances(e));
      for (int r : plan.placement.instances(e)) ++out.rank_groups[static_cast<size_t>(r)];
    }
  return out;
}

double rank_load_factor(double imbalance, int n_experts, int n_experts_local) {
  MOE_CHECK(n_experts >= 1 && n_experts_local >= 1 && n_experts_local <= n_experts,
            cat("rank_load_factor: ", n_experts_local, " local of ", n_experts, " experts"));
  const double E = n_experts, El = n_experts_local;
  const double hot = std::clamp(imbalance, 1.0, E);  // max/mean cannot exceed E
  if (n_experts == 1) return 1.0;
  // The hot expert at `hot` x mean, the other E-1 sharing E - hot means evenly.
  return (hot + (El - 1) * (E - hot) / (E - 1)) / El;
}

namespace {
// Parameters of one expert in each of `blocks` MoE blocks.
double expert_params_of(const ModelConfig& c, int blocks) {
  const double mats = c.moe.activation == Activation::kSwiglu ? 3.0 : 2.0;
  return blocks * mats * static_cast<double>(c.d_model) * static_cast<double>(c.moe.d_ff);
}
}  // namespace

CostModel::CostModel(const ModelConfig& config, int64_t seq_len)
    : config_(config), seq_len_(seq_len) {
  MOE_CHECK(seq_len >= 1, cat("CostModel: seq_len must be positive, got ", seq_len));
}

double CostModel::expert_params() const {
  return expert_params_of(config_, config_.n_moe_layers());
}

std::vector<std::pair<int, int>> CostModel::expert_groups() const {
  std::vector<std::pair<int, int>> groups;
  for (int l = 0; l < config_.n_layers; ++l) {
    if (!config_.is_moe(l)) continue;
    const int E = config_.experts(l);
    auto it =
        std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == E; });
    if (it == groups.end())
      groups.emplace_back(E, 1);
    else
      ++it->second;
  }
  return groups;
}

double CostModel::expert_params_total() const {
  double n = 0;
  for (const auto& [E, blocks] : expert_groups()) n += E * expert_params_of(config_, blocks);
  return n;
}

double CostModel::expert_params_local(int ranks) const {
  double n = 0;
  for (const auto& [E, blocks] : expert_groups())
    n += ((E + ranks - 1) / ranks) * expert_params_of(config_, blocks);
  return n;
}

double CostModel::dense_params() const {
  const double d = static_cast<double>(config_.d_model);
  const double ffn_mats = config_.activation == Activation::kSwiglu ? 3.0 : 2.0;
  double n = static_cast<double>(config_.vocab_size) * d * (config_.tie_embeddings ? 1 : 2) + d;
  for (int l = 0; l < config_.n_layers; ++l) {
    n += 4 * d * d + 2 * d;
    n += config_.is_moe(l) ? d * config_.experts(l)
                           : ffn_mats * d * static_cast<double>(config_.d_ff);
  }
  return n;
}

std::vector<GemmTerm> CostModel::gemms(const Layout& layout, const Workload& work) const {
  const ModelConfig& c = config_;
  const int64_t T = seq_len_, d = c.d_model, t = work.micro_batch * T;
  const int64_t dh = d / c.n_heads;
  const int P = layout.ranks();
  const int64_t glu = c.moe.activation == Activation::kSwiglu ? 2 : 1;
  const int64_t ffn_glu = c.activation == Activation::kSwiglu ? 2 : 1;
  const double L = c.n_layers, Lm = c.n_moe_layers(), Ld = L - Lm;
  std::vector<GemmTerm> g;
  g.push_back({"qkv", t, d, 3 * d, L});
  g.push_back({"attn_out", t, d, d, L});
  const double heads = L * static_cast<double>(work.micro_batch * c.n_heads);
  g.push_back({"attn_qk", T, dh, T, heads});
  g.push_back({"attn_pv", T, T, dh, heads});
  if (Ld > 0) {
    g.push_back({"ffn_up", t, d, ffn_glu * c.d_ff, Ld});
    g.push_back({"ffn_down", t, c.d_ff, d, Ld});
  }
  for (const auto& [n_experts, blocks] : expert_groups()) {
    const int64_t E = n_experts;
    const int64_t El = (E + P - 1) / P;  // the busiest rank's experts
    // Rows of an average expert: t k slots per rank, P t k in all, over E experts.
    const int64_t rows = std::max<int64_t>(1, (t * c.moe.top_k * P + E - 1) / E);
    const double Lg = blocks;
    g.push_back({"router", t, d, E, Lg, n_experts});
    g.push_back({"expert_up", rows, d, glu * c.moe.d_ff, Lg * static_cast<double>(El), n_experts});
    g.push_back({"expert_down", rows, c.moe.d_ff, d, Lg * static_cast<double>(El), n_experts});
  }
  g.push_back({"lm_head", t, d, c.vocab_size, 1});
  return g;
}

StepPrediction CostModel::predict(const Layout& layout, const Workload& work,
                                  const GemmRates& rates, const NetworkParams& net,
                                  const OtherRates& other) const {
  const ModelConfig& c = config_;
  StepPrediction p;
  p.nodes = layout.nodes;
  p.ranks = layout.ranks();
  const int P = layout.ranks();
  const int E = c.min_experts();  // the fewest of any MoE block
  if (layout.nodes < 1 || layout.ranks_per_node < 1 || work.micro_batch < 1 ||
      work.accumulation < 1) {
    p.feasible = false;
    p.why = "nodes, ranks per node, micro-batch and accumulation must be positive";
    return p;
  }
  if (c.n_moe_layers() > 0 && P > E) {
    p.feasible = false;
    p.why = cat(E, " experts cannot be spread over ", P,
                " ranks (at least one expert per rank: --set model.moe.num_experts=N)");
    return p;
  }
  const int64_t t = work.micro_batch * seq_len_;
  const double a = static_cast<double>(work.accumulation);
  p.tokens_per_rank = t * work.accumulation;
  const std::vector<std::pair<int, int>> groups = expert_groups();
  std::vector<double> group_expert_s(groups.size(), 0.0);
  auto group_of = [&](int n_experts) {
    size_t i = 0;
    while (i + 1 < groups.size() && groups[i].first != n_experts) ++i;
    return i;
  };

  // Compute: forward GEMMs at their measured rates, backward twice the FLOPs at the same rate.
  for (const GemmTerm& g : gemms(layout, work)) {
    const double flops = 3.0 * 2.0 * static_cast<double>(g.m) * static_cast<double>(g.k) *
                         static_cast<double>(g.n) * g.count * a;
    const double s = flops / (rates.gflops(g.m, g.k, g.n) * 1e9);
    if (g.what.rfind("expert_", 0) == 0)
      group_expert_s[group_of(g.n_experts)] += s;
    else if (g.what.rfind("attn_qk", 0) == 0 || g.what.rfind("attn_pv", 0) == 0)
      p.attention_s += s;
    else
      p.dense_s += s;
  }
  // The busiest rank's experts, per group of blocks: average rows when El = E / P exactly,
  // scaled by the load of its experts (and by El x P / E when the experts do not divide evenly,
  // already in El).
  std::vector<RebalancedLoad> rbs(groups.size());
  double raw_expert_s = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    const int Eg = groups[i].first, El = (Eg + P - 1) / P;
    double load = rank_load_factor(work.load_factor, Eg, El);
    if (work.rebalance_replicas >= 0 && P > 1) {
      rbs[i] = rebalanced_load_factor(work.load_factor, Eg, P, work.rebalance_replicas);
      load = rbs[i].load;
      p.replicas = std::max(p.replicas, rbs[i].replicas);
    }
    raw_expert_s += group_expert_s[i];
    p.expert_s += group_expert_s[i] * load;
    p.expert_load = load;
  }
  if (groups.size() > 1 && raw_expert_s > 0) p.expert_load = p.expert_s / raw_expert_s;
  p.expert_params_local = expert_params_local(P);
  const double local_params = dense_params() + p.expert_params_local;
  p.optimizer_s = local_params * other.optimizer_bytes_per_param / other.mem_bytes_per_s;
  p.other_s = other.seconds_per_token * static_cast<double>(p.tokens_per_rank);
  const int busy = layout.ranks_per_node * layout.threads_per_rank;
  p.oversubscription = layout.cores_per_node > 0 && busy > layout.cores_per_node
                           ? static_cast<double>(busy) / layout.cores_per_node
                           : 1.0;
  p.compute_s =
      (p.dense_s + p.attention_s + p.expert_s + p.optimizer_s + p.other_s) * p.oversubscription;

  // Exchange: 4 payload exchanges + 1 count exchange per MoE block per micro-step.
  const int N = layout.nodes, R = layout.ranks_per_node;
  p.exchange_bytes = static_cast<double>(t) * c.moe.top_k * static_cast<double>(c.d_model) * 4;
  p.flat_messages = alltoall_flat_messages(N, R);
  p.hier_inter_messages = alltoall_hier_messages(N, R);
  const double n_payload = 4.0 * c.n_moe_layers() * a;
  if (P > 1 && c.n_moe_layers() > 0) {
    p.a2a_flat_s = n_payload * alltoall_flat_seconds(net, N, R, p.exchange_bytes);
    p.a2a_hier_s = n_payload * alltoall_hier_seconds(net, N, R, p.exchange_bytes);
    p.a2a_hier2d_s = n_payload * alltoall_hier2d_seconds(net, N, R, p.exchange_bytes);
    for (const auto& [Eg, blocks] : groups) {  // the count exchange: E counts per block
      const double n_counts = blocks * a, counts_bytes = 4.0 * Eg;
      p.a2a_flat_s += n_counts * alltoall_flat_seconds(net, N, R, counts_bytes);
      p.a2a_hier_s += n_counts * alltoall_hier_seconds(net, N, R, counts_bytes);
      p.a2a_hier2d_s += n_counts * alltoall_hier2d_seconds(net, N, R, counts_bytes);
    }
  }
  p.allreduce_s = P > 1 ? allreduce_ring_seconds(net, N, R, 4.0 * dense_params()) : 0.0;
  // Replica gradient sums: the busiest rank's groups (each of the largest size, an upper bound).
  for (size_t i = 0; i < groups.size(); ++i) {
    const RebalancedLoad& rb = rbs[i];
    if (rb.group_sizes.empty()) continue;
    const double g = *std::max_element(rb.group_sizes.begin(), rb.group_sizes.end());
    const double alpha = N > 1 ? net.alpha : net.alpha_intra;
    const double beta = N > 1 ? net.beta : net.beta_intra;
    // One all-reduce per replicated (block, expert): one expert's gradient in one block.
    const double one =
        2 * (g - 1) / g * 4.0 * expert_params_of(config_, 1) / beta + 2 * (g - 1) * alpha;
    const int rank_groups = *std::max_element(rb.rank_groups.begin(), rb.rank_groups.end());
    p.replica_allreduce_s += one * rank_groups * groups[i].second;
  }
  p.allreduce_s += p.replica_allreduce_s;

  p.step_flat_s = p.compute_s + p.a2a_flat_s + p.allreduce_s;
  p.step_hier_s = p.compute_s + std::min(p.a2a_hier_s, p.a2a_hier2d_s) + p.allreduce_s;
  const double tokens = static_cast<double>(p.tokens_per_rank) * P;
  p.tokens_per_s_flat = p.step_flat_s > 0 ? tokens / p.step_flat_s : 0;
  p.tokens_per_s_hier = p.step_hier_s > 0 ? tokens / p.step_hier_s : 0;
  return p;
}

}  // namespace moe::model
