// File: rebalance.hpp — run-time expert re-placement and replication for the MoE layers of a
// Transformer under training (`comm.rebalance`).
//
// Notation: P ranks, E experts per layer, N = comm.rebalance.every, R = comm.rebalance.replicas.
//
// Once per optimiser step the trainer calls, in this order:
//   observe(model)            after each micro-step: the layers' global per-expert kept slots
//                             (LoadStats, already reduced by the dispatch plan) feed an EMA
//                             (comm::LoadTracker); no extra collective
//   sum_replica_grads(model)  after backward, before the gradient norm: each replicated
//                             expert's gradients are summed over its instances
//                             (comm::ReplicaGroups), so every instance takes the same update
//   end_step(s, model, opt)   after the optimiser step: every N steps, plan every MoE layer
//                             (comm::plan_placement, identical on every rank), and if any map
//                             changed, migrate the moved experts' weights and AdamW state (m, v,
//                             step) point-to-point (comm::migrate_experts), swap in the new
//                             expert banks, and rebuild `opt` over the new expert parameters
// Rebalancing changes where experts live, never the mathematics: the same run with and without
// it gives the same losses up to the summation order of replica gradients.
//
// Checkpoints carry the rebalancing state (save_state, as checkpoint::StateArrays "rebalance.*"):
// every MoE layer's placement (each expert's instance ranks, primary first; slots follow global
// id) and load averages, the tracker's step count and the re-placement count. The next re-plan
// comes after the global step that is a multiple of N, so it needs no counter of its own. A
// resumed run on the same P takes them back (restore) before it loads the tensors, so each
// rank reads the experts of the saved map and the next re-plan decides as without the break.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "comm/rebalance.hpp"
#include "model/optim.hpp"
#include "model/transformer.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/config.hpp"

namespace moe::model {

// comm.rebalance.* (runtime/config.cpp documents every key).
struct RebalanceConfig {
  int64_t every = 0;  // 0 = off
  double ema_decay = 0.9;
  comm::RebalanceOptions plan;
  bool enabled() const { return every > 0; }
  static RebalanceConfig from(const Config& config);
};

// One re-placement, as every rank sees it (byte and expert counts are global sums).
struct RebalanceEvent {
  int64_t step = 0;  // after optimiser step `step` (1-based, as in the metrics)
  int layers_changed = 0;
  int experts_moved = 0;    // instances that arrived on a rank that did not hold them
  int replicas = 0;         // replica instances over all layers after the move
  int max_instances = 0;    // most instances on one rank of one layer after the move
  int cap = 0;              // that layer's comm.rebalance.max_experts_per_rank (resolved)
  int64_t bytes_moved = 0;  // weights + AdamW state sent, all ranks
  double seconds = 0;       // planning + migration + rebuild (slowest rank)
  double imbalance_before = 0, imbalance_after = 0;  // predicted, worst layer
  double predicted_gain = 1;                         // max rank load before / after, worst layer
  double peak_extra_mb = 0;  // staging of moved experts (one layer at a time), largest rank
  std::string moves;         // "L0: 3 r0->r1, 5' r2; L1: ..." (' = a new replica)
};

class ExpertRebalancer {
 public:
  // Throws Error(kConfig) for what it cannot rebalance: UMoE attention experts
  // (model.attention umoe), replicas with model.moe.pipeline_chunks > 1 or a capacity factor, a
  // comm.rebalance.max_experts_per_rank below ceil(E / P) of an MoE layer.
  ExpertRebalancer(const RebalanceConfig& config, Transformer& model,
                   const comm::Communicator& comm);

  const RebalanceConfig& config() const { return config_; }
  void observe(const Transformer& model);      // local
  void sum_replica_grads(Transformer& model);  // collective
  // True when the placement changed (last_event() then describes it). Collective.
  bool end_step(int64_t s, Transformer& model, AdamW& expert_opt);
  // Moves every MoE layer to next[i] (one map per MoE layer, in block order; unchanged maps move
  // nothing): what end_step does after planning. `step` labels the event. Collective.
  const RebalanceEvent& apply(int64_t step, Transformer& model, AdamW& expert_opt,
                              const std::vector<comm::ExpertPlacement>& next);
  // The state a checkpoint keeps (names "rebalance.*", into out). Local.
  void save_state(checkpoint::StateArrays& out) const;
  // Takes back a checkpoint's state: every MoE layer moves to its saved placement without
  // migrating anything (empty expert banks of the saved map; `expert_opt` rebuilt with zero
  // state over them), the load averages and counts are restored. The caller then loads every
  // expert tensor and AdamW state from the checkpoint (replicas included). Returns "" when
  // restored, else why the saved placement is not used (no such state, another P, other MoE
  // blocks or expert counts, a map this run cannot take), having changed nothing. Collective
  // (identical state on every rank gives the same decision everywhere).
  std::string restore(const checkpoint::StateArrays& state, Transformer& model, AdamW& expert_opt);
  // Whether a checkpoint's state holds a saved placement.
  static bool saved(const checkpoint::StateArrays& state);
  const comm::ExpertPlacement& placement(int moe_layer) const {
    return placement_[static_cast<size_t>(moe_layer)];
  }
  const RebalanceEvent& last_event() const { return event_; }
  int64_t rebalances() const { return rebalances_; }
  // Predicted per-rank load from the moving averages and the current maps, summed over layers,
  // as max / mean (1 = even); and the slots each rank received in the last observed step. [P]
  double predicted_imbalance() const;
  // Replica instances over all layers.
  int replicas() const;
  // Memory: most instances on one rank of one MoE layer and that layer's cap (the layer closest
  // to its cap). Local.
  std::pair<int, int> max_instances() const;

 private:
  RebalanceConfig config_;
  const comm::Communicator& comm_;
  std::vector<int> blocks_;  // block index of each MoE layer
  comm::LoadTracker tracker_;
  std::vector<comm::ReplicaGroups> groups_;       // per MoE layer
  std::vector<comm::ExpertPlacement> placement_;  // per MoE layer (also held by the layer)
  RebalanceEvent event_;
  int64_t rebalances_ = 0;
};

// Floats of migrated state per expert of a bank: w1, w2, their m and v, two step counters.
int64_t expert_state_floats(const ExpertBank& bank);

}  // namespace moe::model
