// File: placement.hpp — where each expert lives: global expert id -> (owner rank, local slot),
// plus optional replicas.
//
// Notation: E = experts (global), P = ranks, E_l = expert instances on one rank.
// The map is plain data, so re-placing or replicating experts is a change of map, not of code.
// Every rank holds the same map. An expert has one or more instances on distinct ranks; the
// first is its primary (owner(e), slot(e)): the one checkpoints write and the gradient norm
// counts. Further instances are replicas, identical copies that take a share of the expert's
// tokens (comm/plan.hpp) and whose gradients are summed over the instances (comm/rebalance.hpp).
#pragma once

#include <string>
#include <vector>

namespace moe::comm {

class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  // Contiguous balanced blocks: rank r owns experts [r*E/P .. (r+1)*E/P) (the first E % P ranks
  // own one more). Throws Error(kConfig) naming both numbers when E < P (a rank would hold no
  // expert) or E < 1.
  static ExpertPlacement blocked(int n_experts, int n_ranks);
  // An explicit map: owner[e] for every expert; slots follow increasing global id on each rank.
  // Throws Error(kConfig) on an owner outside [0, P) or a rank with no expert.
  static ExpertPlacement from_owners(const std::vector<int>& owner, int n_ranks);
  // A map with replicas: ranks[e] lists the ranks holding expert e, primary first, all distinct.
  // Slots follow increasing global id on each rank. Throws Error(kConfig) on an empty or
  // repeated list, a rank outside [0, P) or a rank with no expert.
  static ExpertPlacement from_instances(const std::vector<std::vector<int>>& ranks, int n_ranks);

  int n_experts() const { return static_cast<int>(owner_.size()); }
  int n_ranks() const { return static_cast<int>(local_.size()); }
  int owner(int expert) const { return owner_[expert]; }  // the primary instance's rank
  int slot(int expert) const { return slot_[expert]; }    // ... and its slot there
  int n_local(int rank) const { return static_cast<int>(local_[rank].size()); }
  // Global ids of a rank's expert instances (primaries and replicas), in slot order.
  const std::vector<int>& local_experts(int rank) const { return local_[rank]; }
  // Ranks holding expert e, primary first. [n_instances(e)]
  const std::vector<int>& instances(int expert) const { return inst_rank_[expert]; }
  int n_instances(int expert) const { return static_cast<int>(inst_rank_[expert].size()); }
  // Slot of expert e on rank r, or -1 if r holds no instance of it.
  int slot_on(int expert, int rank) const;
  // Replica instances over all experts (instances beyond the first).
  int n_replicas() const;
  bool has_replicas() const { return n_replicas() > 0; }
  // "8 experts over 2 ranks: r0=[0,1,2] r1=[0',3]" (' marks a replica).
  std::string describe() const;
  bool operator==(const ExpertPlacement& o) const {
    return inst_rank_ == o.inst_rank_ && n_ranks() == o.n_ranks();
  }

 private:
  std::vector<int> owner_;                   // [E]
  std::vector<int> slot_;                    // [E]
  std::vector<std::vector<int>> inst_rank_;  // [E][instances] ranks, primary first
  std::vector<std::vector<int>> inst_slot_;  // [E][instances] slots
  std::vector<std::vector<int>> local_;      // [P][E_l]
};

}  // namespace moe::comm
