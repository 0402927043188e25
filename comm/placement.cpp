#include "comm/placement.hpp"

#include <sstream>

#include "runtime/error.hpp"

namespace moe::comm {

ExpertPlacement ExpertPlacement::blocked(int n_experts, int n_ranks) {
  if (n_ranks < 1)
    throw Error(ErrorKind::kConfig, cat("expert placement: need at least one rank, got ", n_ranks));
  if (n_experts < 1 || n_experts < n_ranks)
    throw Error(ErrorKind::kConfig,
                cat("expert placement: ", n_experts, " experts cannot be spread over ", n_ranks,
                    " ranks (every rank must own at least one expert; use at most ", n_experts,
                    " ranks for expert parallelism or more experts)"));
  // rank r owns [r*E/P + min(r, E%P), ...): the first E % P ranks own one more expert.
  std::vector<int> owner(static_cast<size_t>(n_experts));
  const int base = n_experts / n_ranks, extra = n_experts % n_ranks;
  int e = 0;
  for (int r = 0; r < n_ranks; ++r)
    for (int i = 0; i < base + (r < extra ? 1 : 0); ++i) owner[e++] = r;
  return from_owners(owner, n_ranks);
}

ExpertPlacement ExpertPlacement::from_owners(const std::vector<int>& owner, int n_ranks) {
  std::vector<std::vector<int>> ranks(owner.size());
  for (size_t e = 0; e < owner.size(); ++e) ranks[e] = {owner[e]};
  return from_instances(ranks, n_ranks);
}

ExpertPlacement ExpertPlacement::from_instances(const std::vector<std::vector<int>>& ranks,
                                                int n_ranks) {
  if (n_ranks < 1)
    throw Error(ErrorKind::kConfig, cat("expert placement: need at least one rank, got ", n_ranks));
  if (ranks.empty()) throw Error(ErrorKind::kConfig, "expert placement: no experts");
  ExpertPlacement p;
  const size_t E = ranks.size();
  p.owner_.assign(E, 0);
  p.slot_.assign(E, 0);
  p.inst_rank_ = ranks;
  p.inst_slot_.assign(E, {});
  p.local_.assign(static_cast<size_t>(n_ranks), {});
  for (size_t e = 0; e < E; ++e) {
    if (ranks[e].empty())
      throw Error(ErrorKind::kConfig, cat("expert placement: expert ", e, " has no rank"));
    for (size_t i = 0; i < ranks[e].size(); ++i) {
      const int r = ranks[e][i];
      if (r < 0 || r >= n_ranks)
        throw Error(ErrorKind::kConfig, cat("expert placement: expert ", e, " has owner rank ", r,
                                            ", outside [0, ", n_ranks, ")"));
      for (size_t j = 0; j < i; ++j)
        if (ranks[e][j] == r)
          throw Error(ErrorKind::kConfig,
                      cat("expert placement: expert ", e, " has two instances on rank ", r));
      p.inst_slot_[e].push_back(static_cast<int>(p.local_[r].size()));
      p.local_[r].push_back(static_cast<int>(e));
    }
    p.owner_[e] = ranks[e][0];
    p.slot_[e] = p.inst_slot_[e][0];
  }
  for (int r = 0; r < n_ranks; ++r)
    if (p.local_[r].empty())
      throw Error(ErrorKind::kConfig, cat("expert placement: rank ", r, " of ", n_ranks,
                                          " owns none of the ", E, " experts"));
  return p;
}

int ExpertPlacement::slot_on(int expert, int rank) const {
  const std::vector<int>& rs = inst_rank_[expert];
  for (size_t i = 0; i < rs.size(); ++i)
    if (rs[i] == rank) return inst_slot_[expert][i];
  return -1;
}

int ExpertPlacement::n_replicas() const {
  int n = 0;
  for (const auto& rs : inst_rank_) n += static_cast<int>(rs.size()) - 1;
  return n;
}

std::string ExpertPlacement::describe() const {
  std::ostringstream os;
  os << n_experts() << " experts over " << n_ranks() << " ranks:";
  for (int r = 0; r < n_ranks(); ++r) {
    os << " r" << r << "=[";
    for (size_t i = 0; i < local_[r].size(); ++i)
      os << (i ? "," : "") << local_[r][i] << (owner_[local_[r][i]] != r ? "'" : "");
    os << "]";
  }
  return os.str();
}

}  // namespace moe::comm
