// File: rebalance.hpp — load balancing in the exchange: expert load tracking, a deterministic
// placement planner (greedy longest-processing-time + replicas of hot experts), point-to-point
// migration of expert state, and replica-group gradient sums.
//
// Notation: E = experts (global), P = ranks, R = replica budget (extra instances per layer),
// F = floats of state per expert (weights, gradients' optimiser moments, ...), load[e] = an
// expert's token slots per step (an exponential moving average of LoadStats::expert_tokens).
//
// An instance of expert e takes load[e] / n_instances(e): the dispatch plan splits an expert's
// slots evenly among its instances (comm/plan.hpp). A rank's load is the sum of its instances'
// shares; imbalance = max / mean over ranks.
//
// Planning (plan_placement) is a pure function of (load, current placement, options): every rank
// computes the same map from the same (global) statistics, no communication.
//   1. replicas: up to R times, the expert with the largest per-instance share gets one more
//      instance, while that share exceeds the ideal per-rank load total / P (replicating a
//      cooler expert cannot lower the maximum) and it has fewer than P instances;
//   2. lpt: instances by share descending (ties: lower expert id first) go to the least-loaded
//      rank not yet holding that expert (ties: fewer instances, then lower rank); once the
//      instances left are just enough to give every rank min_experts_per_rank, only ranks below
//      that minimum take them;
//      replicate: primaries stay where they are, only the replicas are placed as above;
//   3. the resulting bins are matched to ranks greedily by how many of their experts each rank
//      already holds (ranks are interchangeable for the load), so little moves; and when the
//      instance counts are those of the current map, a local search from it (single moves and
//      swaps between the busiest and the least-loaded rank) is taken instead when it moves no
//      more experts, unless the fresh placement's maximum is lower by more than min_gain;
//   4. if the predicted maximum rank load does not drop by at least min_gain (relative), the
//      current placement is kept (unless it holds more instances on a rank than the cap).
// A cap C on instances per rank (replicas count; max_experts_per_rank, default 2 ceil(E / P))
// bounds the experts' memory on each rank: step 1 adds replicas only while the instances fit
// into P C, steps 2 and 3 give no more instances to a rank at C (the next least-loaded rank
// with room takes them; a replica that fits on no rank holding none of its expert is dropped
// and the plan repeated), and the local search moves an instance only to a rank below C.
// Policy replicate keeps primaries where they are, so there the cap bounds only the replicas.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/placement.hpp"

namespace moe::comm {

enum class RebalancePolicy { kLpt, kReplicate };
RebalancePolicy parse_rebalance_policy(const std::string& name);  // "lpt" | "replicate"
const char* rebalance_policy_name(RebalancePolicy p);

struct RebalanceOptions {
  int replicas = 0;                                // comm.rebalance.replicas: R per layer
  RebalancePolicy policy = RebalancePolicy::kLpt;  // comm.rebalance.policy
  int min_experts_per_rank = 1;                    // every rank keeps at least this many
  double min_gain = 0.05;                          // comm.rebalance.min_gain
  // comm.rebalance.max_experts_per_rank: instances (replicas count) per rank per layer;
  // 0 = 2 ceil(E / P).
  int max_experts_per_rank = 0;
};

// The cap on instances per rank of E experts on P ranks under `options` (the default resolved).
int expert_cap(const RebalanceOptions& options, int n_experts, int n_ranks);
// Throws Error(kConfig) naming the cap and ceil(E / P) when the cap cannot hold the E experts.
void check_expert_cap(const RebalanceOptions& options, int n_experts, int n_ranks);
// Most instances on one rank of a placement.
int max_instances(const ExpertPlacement& placement);

// Rank loads of a placement under load [E] (each instance takes an equal share). [P]
std::vector<double> rank_loads(const std::vector<double>& load, const ExpertPlacement& placement);
// max / mean of rank_loads (0 when there is no load).
double rank_imbalance(const std::vector<double>& load, const ExpertPlacement& placement);

struct PlacementPlan {
  ExpertPlacement placement;  // the new map (== current when not changed)
  bool changed = false;
  double max_before = 0, max_after = 0;  // predicted maximum rank load (slots per step)
  double imbalance_before = 0, imbalance_after = 0;
  int instances_before = 0, instances_after = 0;  // most instances on one rank
  int cap = 0;                                    // expert_cap of the options
  double predicted_gain() const { return max_after > 0 ? max_before / max_after : 1.0; }
};

// The planner above. load has current.n_experts() entries, >= 0. Pure and deterministic.
// Throws Error(kConfig) if P * min_experts_per_rank exceeds the instances available or the cap
// cannot hold the experts (check_expert_cap).
PlacementPlan plan_placement(const std::vector<double>& load, const ExpertPlacement& current,
                             const RebalanceOptions& options);

// Exponential moving average of each layer's per-expert load: at the end of each step,
// ema = decay ema + (1 - decay) step (the first step sets ema = step). Fed with the global
// LoadStats::expert_tokens every rank already has, so every rank holds the same values. Local.
class LoadTracker {
 public:
  LoadTracker(int n_layers, int n_experts, double decay);
  // Layers of different expert counts (model.moe.layer_experts): experts[l] for layer l.
  LoadTracker(const std::vector<int>& experts, double decay);
  void add(int layer, const std::vector<int64_t>& expert_tokens);  // one micro-step
  void end_step();
  const std::vector<double>& load(int layer) const { return ema_[static_cast<size_t>(layer)]; }
  int64_t steps() const { return steps_; }
  // Resumes from saved averages (load(l) of every layer, same sizes) after `steps` steps; the
  // current step's sums restart at zero. Throws Error(kData) on a size mismatch.
  void restore(std::vector<std::vector<double>> ema, int64_t steps);

 private:
  double decay_;
  std::vector<std::vector<double>> ema_, step_;  // [layers][E]
  int64_t steps_ = 0;
};

// What one migration moved (this rank's view).
struct MigrationStats {
  int experts_sent = 0, experts_received = 0;
  int64_t bytes_sent = 0, bytes_received = 0;
};

// What one rank does to move from placement `from` to `to` (same E and P): every instance of
// `to` on a rank that held none of its expert under `from` is sent by the expert's primary under
// `from`; an instance the rank already held stays. Lists in (destination rank, new slot) order.
struct MigrationPlan {
  struct Send {
    int expert, old_slot, dest;
  };
  struct Recv {
    int expert, new_slot, source;
  };
  struct Keep {
    int expert, old_slot, new_slot;
  };
  std::vector<Send> sends;
  std::vector<Recv> recvs;
  std::vector<Keep> keeps;
};
MigrationPlan plan_migration(const ExpertPlacement& from, const ExpertPlacement& to, int rank);

// Moves the rows of a migration plan by point-to-point MPI (MPI_Isend / MPI_Irecv, tag = expert
// id; nothing passes through rank 0): send_rows [sends, F] in plan.sends order, recv_rows
// [recvs, F] filled in plan.recvs order. Only moved experts are staged, so the extra memory is
// what this rank sends and receives. Collective over comm (every rank calls with its own plan,
// also when nothing moves for it).
MigrationStats migrate_experts(const MigrationPlan& plan, int64_t F, const float* send_rows,
                               float* recv_rows, const Communicator& comm);

// One sub-communicator per replicated expert of a placement (its instance ranks); sum() adds a
// gradient over the instances in place, so every instance holds the expert's full gradient.
class ReplicaGroups {
 public:
  ReplicaGroups() = default;
  // Collective over comm: one MPI_Comm_split per replicated expert, in expert order.
  ReplicaGroups(const ExpertPlacement& placement, const Communicator& comm);
  ~ReplicaGroups();
  ReplicaGroups(ReplicaGroups&& o) noexcept;
  ReplicaGroups& operator=(ReplicaGroups&& o) noexcept;
  ReplicaGroups(const ReplicaGroups&) = delete;
  ReplicaGroups& operator=(const ReplicaGroups&) = delete;

  // Whether this rank holds an instance of a replicated expert e.
  bool member(int expert) const;
  // In-place sum of data [n] over expert e's instances (MPI_Allreduce on its group). Collective
  // over the group: its members call it for the same experts in the same (increasing) order.
  void sum(int expert, float* data, int64_t n, const char* what) const;

 private:
  void release();
  std::vector<MPI_Comm> groups_;  // [E] MPI_COMM_NULL where not replicated or not a member
};

}  // namespace moe::comm
