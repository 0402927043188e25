// File: cost_model.hpp — an analytic model of one training step at any node count.
//
// Predicts, for a model shape and a layout of N nodes x R ranks per node (P = N R), the time of
// one optimiser step as
//   step = compute + exchange (All2All of the MoE layers) + all-reduce (dense gradients)
// from per-rank compute rates (GFLOP/s of the GEMMs at the model's own shapes, measured or
// given) and an alpha-beta network (latency alpha in s, bandwidth beta in B/s; one pair inside a
// node, one between nodes). `moe-plan` (examples/moe-plan.cpp) prints its tables; the model has
// no MPI and no clock, so every figure is reproducible and unit-testable.
//
// Notation: d = model width, f = expert hidden width, E = experts, k = top-k, L = blocks,
// L_moe = MoE blocks, T = seq_len, t = tokens per rank per micro-step (micro_batch x T),
// a = accumulation steps, N = nodes, R = ranks per node, P = N R, E_l = E / P.
//
// Blocks may have their own expert counts (model.moe.layer_experts, e.g. after pruning): every
// expert figure (weights, router and expert GEMMs, load factors, the count exchange) is then a
// sum over the MoE blocks, each with its own E; blocks of equal E are grouped into one term.
//
// Assumptions (stated so a reader can judge the figures):
// - Routing is uniform: each rank sends t k d 4 bytes per exchange, (P-1)/P of it to other
//   ranks. Expert load imbalance (max/mean over experts, `load_factor`) slows the busiest rank's
//   expert GEMMs, and every rank waits for it at the next exchange.
// - Four exchanges per MoE block per micro-step: dispatch and combine, and their adjoints in
//   backward; plus one count exchange (latency only) per MoE block per micro-step.
// - Backward GEMMs run at the rate of the forward GEMM of the same shape (2x its FLOPs).
// - No overlap of communication with compute (the runtime overlaps the all-reduce with
//   backward, so this is an upper bound there).
// - The ranks of a node share its network link, and oversubscribed cores (R x threads > cores)
//   slow compute by R x threads / cores.
// - Rebalancing (Workload::rebalance_replicas >= 0): the planner of comm/rebalance.hpp runs on
//   the same one-hot-expert loads from the blocked placement; the busiest rank's expert time
//   scales with its planned load, and each replicated expert adds, once per step and MoE
//   block, a ring all-reduce of its gradients over its g instances,
//   2 (g-1)/g bytes / beta + 2 (g-1) alpha (inter-node pair when there are several nodes). The
//   migrations themselves (every comm.rebalance.every steps) are not modelled.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/transformer.hpp"

namespace moe::model {

// The alpha-beta network: inter-node (alpha, beta) and intra-node (alpha_intra, beta_intra).
struct NetworkParams {
  double alpha = 2e-6;          // s per inter-node message
  double beta = 12.5e9;         // B/s of one node's link (100 Gb/s)
  double alpha_intra = 0.5e-6;  // s per message inside a node
  double beta_intra = 10e9;     // B/s of a copy inside a node (shared memory)
};

// GFLOP/s of one rank's threads on an [m, k] x [k, n] GEMM: a constant, or a table of measured
// shapes (nearest shape in log space wins, e.g. from `moe-bench gemm --json`).
class GemmRates {
 public:
  explicit GemmRates(double gflops = 50.0) : constant_(gflops) {}
  void add(int64_t m, int64_t k, int64_t n, double gflops);
  double gflops(int64_t m, int64_t k, int64_t n) const;
  bool has(int64_t m, int64_t k, int64_t n) const;
  size_t size() const { return shapes_.size(); }

 private:
  struct Shape {
    int64_t m, k, n;
    double gflops;
  };
  double constant_;
  std::vector<Shape> shapes_;
};

// Per-rank rates of the work that is not a GEMM.
struct OtherRates {
  double mem_bytes_per_s = 10e9;  // optimiser and gradient sweeps (bytes per parameter below)
  double optimizer_bytes_per_param = 40;  // AdamW reads/writes p, g, m, v + zero + norm
  double seconds_per_token = 0;           // norms, softmax, activations, loss, routing (calibrated)
};

// Where the ranks run.
struct Layout {
  int nodes = 1;
  int ranks_per_node = 1;
  int threads_per_rank = 1;
  int cores_per_node = 0;  // 0: never oversubscribed
  int ranks() const { return nodes * ranks_per_node; }
};

// One rank's work per optimiser step.
struct Workload {
  int64_t micro_batch = 1;   // sequences per rank per micro-step
  int64_t accumulation = 1;  // micro-steps per optimiser step
  double load_factor = 1.0;  // max/mean expert load (1 = balanced)
  // Run-time rebalancing (comm.rebalance): -1 = off (blocked placement); R >= 0 = re-placed by
  // the planner (comm::plan_placement, policy lpt) with up to R replicas per MoE layer.
  int rebalance_replicas = -1;
};

// One GEMM of the forward pass, per micro-step per rank: `count` calls of [m, k] x [k, n].
struct GemmTerm {
  std::string what;
  int64_t m = 0, k = 0, n = 0;
  double count = 0;
  int n_experts = 0;  // router and expert terms: E of the blocks they stand for
};

struct StepPrediction {
  bool feasible = true;
  std::string why;  // when not feasible
  int nodes = 0, ranks = 0;
  int64_t tokens_per_rank = 0;      // per optimiser step
  double oversubscription = 1;      // compute slow-down
  double expert_load = 1;           // busiest rank's expert load over the mean (blocks of
                                    // different E: weighted by their expert time)
  double expert_params_local = 0;   // busiest rank's expert parameters (all MoE blocks)
  int replicas = 0;                 // replica instances per MoE layer (rebalancing; the most)
  double replica_allreduce_s = 0;   // per step: the busiest rank's replica gradient sums
  double dense_s = 0;               // attention projections, dense FFNs, router, LM head
  double attention_s = 0;           // QK^T and PV
  double expert_s = 0;              // expert GEMMs on the busiest rank
  double optimizer_s = 0;           // AdamW and gradient sweeps over this rank's parameters
  double other_s = 0;               // seconds_per_token x tokens
  double compute_s = 0;             // sum of the five above
  double exchange_bytes = 0;        // per exchange, leaving one rank
  int64_t flat_messages = 0;        // per exchange, per rank
  int64_t hier_inter_messages = 0;  // per exchange, per node leader
  double a2a_flat_s = 0;            // per step, all exchanges
  double a2a_hier_s = 0;            // leader variant: gather, one inter-node exchange, scatter
  double a2a_hier2d_s = 0;          // 2D variant: regroup in node, R parallel inter-node exchanges
  double allreduce_s = 0;           // ring all-reduce of the dense gradients
  double step_flat_s = 0, step_hier_s = 0;  // hier = the faster of the two node-aware variants
  double tokens_per_s_flat = 0, tokens_per_s_hier = 0;
};

class CostModel {
 public:
  explicit CostModel(const ModelConfig& config, int64_t seq_len);

  // The forward GEMMs of one micro-step on one rank (t = micro_batch x T tokens), experts with
  // the rows of an average expert (t k / E_l). For tests and for measuring rates at exactly
  // these shapes.
  std::vector<GemmTerm> gemms(const Layout& layout, const Workload& work) const;

  StepPrediction predict(const Layout& layout, const Workload& work, const GemmRates& rates,
                         const NetworkParams& net, const OtherRates& other) const;

  // Parameters: replicated dense ones (all-reduced) and those of one expert (one per MoE block).
  double dense_params() const;
  double expert_params() const;
  // Expert parameters of every MoE block, each block with its own E; and those on the busiest of
  // P ranks (ceil(E / P) experts of each block).
  double expert_params_total() const;
  double expert_params_local(int ranks) const;
  // The MoE blocks grouped by expert count, in block order of first appearance: (E, blocks).
  std::vector<std::pair<int, int>> expert_groups() const;
  const ModelConfig& config() const { return config_; }
  int64_t seq_len() const { return seq_len_; }

 private:
  ModelConfig config_;
  int64_t seq_len_;
};

// Seconds of one All2All in which every rank sends `bytes` (its whole payload, including the
// share that stays home) spread uniformly over all P = nodes x rpn ranks. Zero for P = 1.
//   flat:   alpha_i + b (R-1)/P / beta_i  +  (P-R) alpha + R b (P-R)/P / beta
//   hier:   gather and scatter in the node through a leader, 2 [(R-1) alpha_i + (R-1) b / beta_i],
//           plus the leaders' exchange (N-1) alpha + R b (N-1)/N / beta
//   hier2d: regroup by destination inside the node, (R-1) alpha_i + b (R-1)/R / beta_i, then each
//           local rank exchanges with its N-1 peers, (N-1) alpha + R b (N-1)/N / beta
double alltoall_flat_seconds(const NetworkParams& net, int nodes, int rpn, double bytes);
double alltoall_hier_seconds(const NetworkParams& net, int nodes, int rpn, double bytes);
double alltoall_hier2d_seconds(const NetworkParams& net, int nodes, int rpn, double bytes);
// Messages one rank sends per flat exchange (P - 1), and per node leader per hierarchical one.
int64_t alltoall_flat_messages(int nodes, int rpn);
int64_t alltoall_hier_messages(int nodes, int rpn);
// Ring all-reduce of `bytes`: 2 (P-1)/P bytes / beta + 2 (P-1) alpha, with the inter-node pair
// when the ring crosses nodes and the intra-node pair otherwise.
double allreduce_ring_seconds(const NetworkParams& net, int nodes, int rpn, double bytes);

// Busiest rank's expert load over the mean when experts have max/mean load `imbalance` and each
// rank holds E_l of E: one hot expert, the others sharing the rest evenly. 1 when E_l = E.
double rank_load_factor(double imbalance, int n_experts, int n_experts_local);

// The same after rebalancing over P ranks with up to `replicas` replicas (the planner of
// comm/rebalance.hpp on those loads, with its default cap of 2 ceil(E / P) instances per rank):
// the busiest rank's load over the mean, and the placement.
struct RebalancedLoad {
  double load = 1;
  int replicas = 0;
  std::vector<int> group_sizes;  // instances of each replicated expert
  std::vector<int> rank_groups;  // [P] replica groups each rank belongs to
  int max_instances = 0;         // most expert instances on one rank
};
RebalancedLoad rebalanced_load_factor(double imbalance, int n_experts, int n_ranks, int replicas);

}  // namespace moe::model
