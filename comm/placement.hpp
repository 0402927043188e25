// File: placement.hpp — where each expert lives: global expert id -> (owner rank, local slot).
//
// Notation: E = experts (global), P = ranks, E_l = experts on one rank.
// The map is plain data, so re-placing or (later) replicating experts is a change of map, not of
// code. Every rank holds the same map.
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

  int n_experts() const { return static_cast<int>(owner_.size()); }
  int n_ranks() const { return static_cast<int>(local_.size()); }
  int owner(int expert) const { return owner_[expert]; }
  int slot(int expert) const { return slot_[expert]; }
  int n_local(int rank) const { return static_cast<int>(local_[rank].size()); }
  // Global ids of a rank's experts, in slot order.
  const std::vector<int>& local_experts(int rank) const { return local_[rank]; }
  std::string describe() const;

 private:
  std::vector<int> owner_;               // [E]
  std::vector<int> slot_;                // [E]
  std::vector<std::vector<int>> local_;  // [P][E_l]
};

}  // namespace moe::comm
