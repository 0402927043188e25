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
  if (n_ranks < 1)
    throw Error(ErrorKind::kConfig, cat("expert placement: need at least one rank, got ", n_ranks));
  if (owner.empty()) throw Error(ErrorKind::kConfig, "expert placement: no experts");
  ExpertPlacement p;
  p.owner_ = owner;
  p.slot_.assign(owner.size(), 0);
  p.local_.assign(static_cast<size_t>(n_ranks), {});
  for (size_t e = 0; e < owner.size(); ++e) {
    const int r = owner[e];
    if (r < 0 || r >= n_ranks)
      throw Error(ErrorKind::kConfig, cat("expert placement: expert ", e, " has owner rank ", r,
                                          ", outside [0, ", n_ranks, ")"));
    p.slot_[e] = static_cast<int>(p.local_[r].size());
    p.local_[r].push_back(static_cast<int>(e));
  }
  for (int r = 0; r < n_ranks; ++r)
    if (p.local_[r].empty())
      throw Error(ErrorKind::kConfig, cat("expert placement: rank ", r, " of ", n_ranks,
                                          " owns none of the ", owner.size(), " experts"));
  return p;
}

std::string ExpertPlacement::describe() const {
  std::ostringstream os;
  os << n_experts() << " experts over " << n_ranks() << " ranks:";
  for (int r = 0; r < n_ranks(); ++r) {
    os << " r" << r << "=[";
    for (size_t i = 0; i < local_[r].size(); ++i) os << (i ? "," : "") << local_[r][i];
    os << "]";
  }
  return os.str();
}

}  // namespace moe::comm
