// Unit tests of model/cost_model: hand-computable network cases, the flat message count, the
// model's FLOPs against ModelConfig::flops_per_token, imbalance, monotonic behaviour, and blocks
// of their own expert counts summed block by block.
#include "model/cost_model.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "runtime/error.hpp"

namespace moe::model {
namespace {

ModelConfig small_config(int n_experts = 8) {
  ModelConfig c;
  c.vocab_size = 256;
  c.d_model = 256;
  c.n_layers = 4;
  c.n_heads = 4;
  c.d_ff = 2048;
  c.moe_every_n = 1;
  c.moe.n_experts = n_experts;
  c.moe.top_k = 2;
  c.moe.d_ff = 1024;
  return c;
}

NetworkParams simple_net() {
  NetworkParams n;
  n.alpha = 1e-6;
  n.beta = 1e9;
  n.alpha_intra = 1e-7;
  n.beta_intra = 1e10;
  return n;
}

TEST(CostModel, OneRankHasNoCommunication) {
  CostModel m(small_config(), 256);
  Workload w;
  w.micro_batch = 8;
  StepPrediction p = m.predict({1, 1, 1, 0}, w, GemmRates(50), simple_net(), OtherRates());
  ASSERT_TRUE(p.feasible);
  EXPECT_EQ(p.a2a_flat_s, 0.0);
  EXPECT_EQ(p.a2a_hier_s, 0.0);
  EXPECT_EQ(p.allreduce_s, 0.0);
  EXPECT_EQ(p.flat_messages, 0);
  EXPECT_GT(p.compute_s, 0.0);
  EXPECT_DOUBLE_EQ(p.step_flat_s, p.compute_s);
  EXPECT_EQ(alltoall_flat_seconds(simple_net(), 1, 1, 1e6), 0.0);
  EXPECT_EQ(alltoall_hier_seconds(simple_net(), 1, 1, 1e6), 0.0);
  EXPECT_EQ(allreduce_ring_seconds(simple_net(), 1, 1, 1e6), 0.0);
}

TEST(CostModel, FlatMessageCountIsRanksMinusOne) {
  EXPECT_EQ(alltoall_flat_messages(1, 1), 0);
  EXPECT_EQ(alltoall_flat_messages(1, 4), 3);
  EXPECT_EQ(alltoall_flat_messages(8, 4), 31);
  EXPECT_EQ(alltoall_flat_messages(512, 1), 511);
  EXPECT_EQ(alltoall_hier_messages(8, 4), 7);  // one per other node, per leader
}

TEST(CostModel, HandComputedExchanges) {
  const NetworkParams n = simple_net();
  const double b = 1e6;
  // 2 nodes x 1 rank: one inter-node message carrying half the payload.
  EXPECT_DOUBLE_EQ(alltoall_flat_seconds(n, 2, 1, b), 1e-6 + b / 2 / 1e9);
  // 1 node x 4 ranks: 3 intra-node messages, 3/4 of the payload.
  EXPECT_DOUBLE_EQ(alltoall_flat_seconds(n, 1, 4, b), 3 * 1e-7 + b * 3 / 4 / 1e10);
  // 2 nodes x 2 ranks flat: 1 intra message (b/4), 2 inter messages, the node's link carries
  // 2 ranks x b/2.
  EXPECT_DOUBLE_EQ(alltoall_flat_seconds(n, 2, 2, b),
                   1e-7 + b * 1 / 4 / 1e10 + 2 * 1e-6 + 2 * b * 2 / 4 / 1e9);
  // hierarchical (leader): gather + scatter of 1 peer's b each, one leader message of 2b/2.
  EXPECT_DOUBLE_EQ(alltoall_hier_seconds(n, 2, 2, b),
                   2 * (1e-7 + b / 1e10) + 1e-6 + 2 * b / 2 / 1e9);
  // 2D: regroup half the payload in the node, then one inter message per local rank.
  EXPECT_DOUBLE_EQ(alltoall_hier2d_seconds(n, 2, 2, b),
                   1e-7 + b / 2 / 1e10 + 1e-6 + 2 * b / 2 / 1e9);
  // One rank per node: the node-aware variants are the flat exchange.
  EXPECT_DOUBLE_EQ(alltoall_hier_seconds(n, 16, 1, b), alltoall_flat_seconds(n, 16, 1, b));
  EXPECT_DOUBLE_EQ(alltoall_hier2d_seconds(n, 16, 1, b), alltoall_flat_seconds(n, 16, 1, b));
  // Ring all-reduce over 4 nodes: 2 (P-1)/P bytes / beta + 2 (P-1) alpha.
  EXPECT_DOUBLE_EQ(allreduce_ring_seconds(n, 4, 1, 1e9), 1.5 + 6e-6);
  // Inside one node the intra-node pair applies.
  EXPECT_DOUBLE_EQ(allreduce_ring_seconds(n, 1, 2, 1e9), 1e9 / 1e10 + 2e-7);
}

TEST(CostModel, ManyRanksPerNodeFavourHierarchical) {
  const NetworkParams n = simple_net();
  const double b = 4096.0 * 2 * 256 * 4;
  // 64 nodes x 8 ranks: 511 small messages per rank vs 63 per leader.
  EXPECT_LT(alltoall_hier2d_seconds(n, 64, 8, 1e3), alltoall_flat_seconds(n, 64, 8, 1e3));
  // The bytes on each node's link are the same (8 b 504/512 = 8 b 63/64); the 2D variant
  // sends 441 fewer inter-node messages and copies more inside the node.
  EXPECT_NEAR(alltoall_hier2d_seconds(n, 64, 8, b) - alltoall_flat_seconds(n, 64, 8, b),
              (63 - 504) * 1e-6 + b * (7.0 / 8 - 7.0 / 512) / 1e10, 1e-12);
}

TEST(CostModel, GemmFlopsMatchFlopsPerToken) {
  ModelConfig c = small_config();
  CostModel m(c, 256);
  Workload w;
  w.micro_batch = 2;
  double flops = 0;
  for (const GemmTerm& g : m.gemms({1, 1, 1, 0}, w))
    flops += 3.0 * 2.0 * static_cast<double>(g.m) * g.k * g.n * g.count;
  const double per_token = flops / (2 * 256);
  // flops_per_token also counts the norm gains (2 per block + the final one) as parameters.
  const double norms = 6.0 * (2 * c.d_model * c.n_layers + c.d_model);
  EXPECT_NEAR(per_token, c.flops_per_token(256) - norms, 1e-9 * per_token);
}

TEST(CostModel, RankLoadFactor) {
  EXPECT_DOUBLE_EQ(rank_load_factor(2.0, 8, 8), 1.0);  // one rank holds every expert
  EXPECT_DOUBLE_EQ(rank_load_factor(2.0, 8, 1), 2.0);  // one expert per rank
  EXPECT_DOUBLE_EQ(rank_load_factor(1.0, 8, 2), 1.0);  // balanced
  // 2 of 8 experts: the hot one at 2, the other at (8-2)/7.
  EXPECT_DOUBLE_EQ(rank_load_factor(2.0, 8, 2), (2.0 + 6.0 / 7) / 2);
  EXPECT_LT(rank_load_factor(1.5, 8, 2), rank_load_factor(3.0, 8, 2));
  EXPECT_THROW(rank_load_factor(2.0, 8, 9), Error);
}

TEST(CostModel, ImbalanceSlowsExpertsOnly) {
  CostModel m(small_config(), 256);
  Workload even, skew;
  even.micro_batch = skew.micro_batch = 4;
  skew.load_factor = 2.0;
  const Layout l{8, 1, 1, 0};  // one expert per rank
  StepPrediction a = m.predict(l, even, GemmRates(50), simple_net(), OtherRates());
  StepPrediction b = m.predict(l, skew, GemmRates(50), simple_net(), OtherRates());
  EXPECT_NEAR(b.expert_s, 2 * a.expert_s, 1e-12);
  EXPECT_DOUBLE_EQ(b.dense_s, a.dense_s);
  EXPECT_DOUBLE_EQ(b.a2a_flat_s, a.a2a_flat_s);
}

TEST(CostModel, RebalancingEvensTheLoadAndPaysForReplicas) {
  // 8 experts, the hot one at 4x the mean (half of all slots): blocked on 2 ranks the busiest
  // rank carries (4 + 3 x 4/7) / 4 of the mean; re-placed, the hot expert alone on one rank
  // balances exactly, with no replica needed.
  const RebalancedLoad two = rebalanced_load_factor(4.0, 8, 2, 2);
  EXPECT_NEAR(rank_load_factor(4.0, 8, 4), (4 + 3 * 4.0 / 7) / 4, 1e-12);
  EXPECT_DOUBLE_EQ(two.load, 1.0);
  EXPECT_EQ(two.replicas, 0);
  // On 8 ranks the hot expert needs replicas: without them the busiest rank carries 4x.
  EXPECT_DOUBLE_EQ(rebalanced_load_factor(4.0, 8, 8, 0).load, 4.0);
  const RebalancedLoad eight = rebalanced_load_factor(4.0, 8, 8, 3);
  EXPECT_EQ(eight.replicas, 3);
  EXPECT_LE(eight.max_instances, 2);  // the planner's default cap, 2 ceil(8 / 8)
  EXPECT_LE(rebalanced_load_factor(16.0, 64, 8, 4).max_instances, 16);
  EXPECT_LT(eight.load, 1.5);
  // In the prediction: the experts speed up, and the replicas add gradient all-reduces.
  CostModel m(small_config(), 256);
  Workload skew, rebal;
  skew.micro_batch = rebal.micro_batch = 4;
  skew.load_factor = rebal.load_factor = 4.0;
  rebal.rebalance_replicas = 3;
  const Layout l{8, 1, 1, 0};
  StepPrediction a = m.predict(l, skew, GemmRates(50), simple_net(), OtherRates());
  StepPrediction b = m.predict(l, rebal, GemmRates(50), simple_net(), OtherRates());
  EXPECT_NEAR(b.expert_s / a.expert_s, eight.load / 4.0, 1e-12);
  EXPECT_EQ(b.replicas, 3);
  EXPECT_GT(b.replica_allreduce_s, 0.0);
  EXPECT_DOUBLE_EQ(b.allreduce_s - b.replica_allreduce_s, a.allreduce_s);
  // One all-reduce per replicated (block, expert), of one expert's gradient in one block: the
  // term grows linearly with the MoE blocks (4 here against 1).
  ModelConfig one_block = small_config();
  one_block.n_layers = 1;
  StepPrediction c =
      CostModel(one_block, 256).predict(l, rebal, GemmRates(50), simple_net(), OtherRates());
  EXPECT_NEAR(b.replica_allreduce_s, 4 * c.replica_allreduce_s, 1e-12 * b.replica_allreduce_s);
}

// Two MoE blocks of `first` and `second` experts (model.moe.layer_experts), or one block of
// `first` experts when second is 0.
ModelConfig per_layer_config(int first, int second) {
  ModelConfig c = small_config(std::max(first, second));
  c.n_layers = second > 0 ? 2 : 1;
  if (second > 0) c.layer_experts = {first, second};
  return c;
}

// Forward FLOPs of one micro-step's GEMMs whose names start with `what`.
double flops_of(const CostModel& m, const Layout& l, const Workload& w, const std::string& what) {
  double f = 0;
  for (const GemmTerm& g : m.gemms(l, w))
    if (g.what.rfind(what, 0) == 0) f += 2.0 * static_cast<double>(g.m) * g.k * g.n * g.count;
  return f;
}

TEST(CostModel, LayerExpertCountsSumBlockByBlock) {
  const CostModel m84(per_layer_config(8, 4), 256), m88(per_layer_config(8, 8), 256);
  const CostModel m8(per_layer_config(8, 0), 256), m4(per_layer_config(4, 0), 256);
  const Layout l{2, 2, 1, 0};  // 4 ranks: 2 and 1 experts per rank
  Workload w;
  w.micro_batch = 4;
  w.load_factor = 2.0;
  auto predict = [&](const CostModel& m, const Workload& work) {
    return m.predict(l, work, GemmRates(50), simple_net(), OtherRates());
  };
  const StepPrediction p84 = predict(m84, w), p88 = predict(m88, w);
  const StepPrediction p8 = predict(m8, w), p4 = predict(m4, w);
  ASSERT_TRUE(p84.feasible && p88.feasible && p8.feasible && p4.feasible);
  // Fewer experts in the second block: less expert memory, router compute and count exchange
  // than [8, 8] ...
  EXPECT_LT(m84.expert_params_total(), m88.expert_params_total());
  EXPECT_LT(p84.expert_params_local, p88.expert_params_local);
  EXPECT_LT(m84.dense_params(), m88.dense_params());  // a smaller router
  EXPECT_LT(flops_of(m84, l, w, "router"), flops_of(m88, l, w, "router"));
  EXPECT_LT(p84.a2a_flat_s, p88.a2a_flat_s);
  // ... while the expert GEMMs do the same work (k experts per token whatever E; with 1 expert
  // per rank in the second block its busiest rank carries the hot expert's whole load).
  EXPECT_EQ(flops_of(m84, l, w, "expert_"), flops_of(m88, l, w, "expert_"));
  EXPECT_GT(p84.expert_s, p88.expert_s);
  // ... and exactly the sum of one block of 8 and one block of 4 (every figure here is a sum of
  // the same per-block terms; the exchange times within 1e-12 relative, their summation order
  // differs).
  EXPECT_EQ(m84.expert_params_total(), m8.expert_params_total() + m4.expert_params_total());
  EXPECT_EQ(m84.expert_params_total(), (8 + 4) * m8.expert_params());
  EXPECT_EQ(p84.expert_params_local, p8.expert_params_local + p4.expert_params_local);
  EXPECT_EQ(p84.expert_params_local, (2 + 1) * m8.expert_params());
  EXPECT_EQ(flops_of(m84, l, w, "expert_"),
            flops_of(m8, l, w, "expert_") + flops_of(m4, l, w, "expert_"));
  EXPECT_EQ(flops_of(m84, l, w, "router"),
            flops_of(m8, l, w, "router") + flops_of(m4, l, w, "router"));
  EXPECT_DOUBLE_EQ(p84.expert_s, p8.expert_s + p4.expert_s);  // each block at its own load
  EXPECT_NEAR(p84.a2a_flat_s, p8.a2a_flat_s + p4.a2a_flat_s, 1e-12 * p84.a2a_flat_s);
  EXPECT_NEAR(p84.a2a_hier_s, p8.a2a_hier_s + p4.a2a_hier_s, 1e-12 * p84.a2a_hier_s);
  EXPECT_NEAR(
      p84.expert_load,
      (p8.expert_s + p4.expert_s) / (p8.expert_s / p8.expert_load + p4.expert_s / p4.expert_load),
      1e-12);
  // Equal counts given per block are the same model as one count for all.
  const StepPrediction same = predict(CostModel(small_config(8), 256), w);
  ModelConfig c = small_config(8);
  c.layer_experts = {8, 8, 8, 8};
  const StepPrediction listed = predict(CostModel(c, 256), w);
  EXPECT_EQ(listed.step_flat_s, same.step_flat_s);
  EXPECT_EQ(listed.expert_load, same.expert_load);
  // Rebalancing plans each block with its own count.
  Workload rb = w;
  rb.rebalance_replicas = 1;
  const StepPrediction r84 = predict(m84, rb), r8 = predict(m8, rb), r4 = predict(m4, rb);
  EXPECT_DOUBLE_EQ(r84.expert_s, r8.expert_s + r4.expert_s);
  EXPECT_EQ(r84.replicas, std::max(r8.replicas, r4.replicas));
  // The ranks may not exceed the smallest block's experts.
  EXPECT_FALSE(m84.predict({1, 8, 1, 0}, w, GemmRates(50), simple_net(), OtherRates()).feasible);
  EXPECT_TRUE(m88.predict({1, 8, 1, 0}, w, GemmRates(50), simple_net(), OtherRates()).feasible);
}

TEST(CostModel, WeakScalingIsMonotonic) {
  CostModel m(small_config(1024), 256);
  Workload w;
  w.micro_batch = 8;
  // Without the optimiser's sweep over the local experts (which shrinks as experts spread out
  // and can make weak-scaling efficiency exceed 1), per-rank work is constant and only the
  // communication grows.
  OtherRates no_optim;
  no_optim.mem_bytes_per_s = 1e30;
  double last_a2a = -1, last_step = 0, last_eff = 2;
  const StepPrediction one = m.predict({1, 1, 1, 0}, w, GemmRates(50), simple_net(), no_optim);
  for (int nodes : {1, 2, 8, 64, 512, 1024}) {
    StepPrediction p = m.predict({nodes, 1, 1, 0}, w, GemmRates(50), simple_net(), no_optim);
    ASSERT_TRUE(p.feasible) << p.why;
    EXPECT_GE(p.a2a_flat_s, last_a2a) << nodes;
    EXPECT_GE(p.step_flat_s, last_step) << nodes;
    const double eff = p.tokens_per_s_flat / (nodes * one.tokens_per_s_flat);
    EXPECT_LE(eff, last_eff + 1e-12) << nodes;
    EXPECT_LE(eff, 1.0 + 1e-12);
    last_a2a = p.a2a_flat_s;
    last_step = p.step_flat_s;
    last_eff = eff;
  }
}

TEST(CostModel, StrongScalingShrinksCompute) {
  CostModel m(small_config(64), 256);
  double last = 1e30;
  for (int P : {1, 2, 4, 8, 16}) {
    Workload w;
    w.micro_batch = 64 / P;
    StepPrediction p = m.predict({P, 1, 1, 0}, w, GemmRates(50), simple_net(), OtherRates());
    EXPECT_LT(p.compute_s, last) << P;
    last = p.compute_s;
  }
}

TEST(CostModel, OversubscriptionAndInfeasibleLayouts) {
  CostModel m(small_config(), 256);
  Workload w;
  w.micro_batch = 4;
  StepPrediction two = m.predict({1, 2, 1, 2}, w, GemmRates(50), simple_net(), OtherRates());
  StepPrediction four = m.predict({1, 4, 1, 2}, w, GemmRates(50), simple_net(), OtherRates());
  EXPECT_DOUBLE_EQ(two.oversubscription, 1.0);
  EXPECT_DOUBLE_EQ(four.oversubscription, 2.0);
  StepPrediction too_many = m.predict({16, 1, 1, 0}, w, GemmRates(50), simple_net(), OtherRates());
  EXPECT_FALSE(too_many.feasible);
  EXPECT_NE(too_many.why.find("8 experts cannot be spread over 16 ranks"), std::string::npos);
}

TEST(CostModel, GemmRatesNearestShape) {
  GemmRates r;
  r.add(256, 512, 2048, 40);
  r.add(4096, 512, 2048, 60);
  EXPECT_DOUBLE_EQ(r.gflops(300, 512, 2048), 40);
  EXPECT_DOUBLE_EQ(r.gflops(3000, 512, 2048), 60);
  EXPECT_DOUBLE_EQ(GemmRates(33).gflops(1, 2, 3), 33);
}

}  // namespace
}  // namespace moe::model
