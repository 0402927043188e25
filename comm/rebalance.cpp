#include "comm/rebalance.hpp"

#include <algorithm>
#include <numeric>
#include <utility>

#include "runtime/error.hpp"

namespace moe::comm {

RebalancePolicy parse_rebalance_policy(const std::string& name) {
  if (name == "lpt") return RebalancePolicy::kLpt;
  if (name == "replicate") return RebalancePolicy::kReplicate;
  throw Error(ErrorKind::kConfig,
              cat("comm.rebalance.policy = '", name, "': expected lpt or replicate"));
}

const char* rebalance_policy_name(RebalancePolicy p) {
  return p == RebalancePolicy::kLpt ? "lpt" : "replicate";
}

std::vector<double> rank_loads(const std::vector<double>& load, const ExpertPlacement& placement) {
  std::vector<double> out(static_cast<size_t>(placement.n_ranks()), 0.0);
  for (int e = 0; e < placement.n_experts(); ++e) {
    const double share = load[static_cast<size_t>(e)] / placement.n_instances(e);
    for (int r : placement.instances(e)) out[static_cast<size_t>(r)] += share;
  }
  return out;
}

namespace {

double max_over_mean(const std::vector<double>& v) {
  const double total = std::accumulate(v.begin(), v.end(), 0.0);
  if (!(total > 0.0)) return 0.0;
  return *std::max_element(v.begin(), v.end()) * static_cast<double>(v.size()) / total;
}

struct Instance {
  int expert;
  double share;
};

// Puts `inst` (share descending) into bins: least load, then fewest instances, then lowest
// index, never two instances of one expert in a bin nor more than `cap` in one; the last
// instances fill bins below min. Returns -1, or the expert of an instance no bin could take
// (the bins then hold what was placed before it).
int lpt_fill(const std::vector<Instance>& inst, int min_per_bin, int cap,
             std::vector<std::vector<int>>& bins, std::vector<double>& bin_load) {
  const size_t P = bins.size();
  for (size_t i = 0; i < inst.size(); ++i) {
    int64_t missing = 0;
    for (const auto& b : bins) missing += std::max<int64_t>(0, min_per_bin - int64_t(b.size()));
    const bool forced = int64_t(inst.size() - i) <= missing;
    auto holds = [&](size_t b) {
      return std::find(bins[b].begin(), bins[b].end(), inst[i].expert) != bins[b].end();
    };
    int best = -1;
    for (int pass = 0; pass < 2 && best < 0; ++pass)  // pass 1: drop the minimum rule
      for (size_t b = 0; b < P; ++b) {
        if (holds(b) || int(bins[b].size()) >= cap ||
            (pass == 0 && forced && int(bins[b].size()) >= min_per_bin))
          continue;
        if (best < 0 || bin_load[b] < bin_load[best] ||
            (bin_load[b] == bin_load[best] && bins[b].size() < bins[best].size()))
          best = static_cast<int>(b);
      }
    if (best < 0) return inst[i].expert;
    bins[best].push_back(inst[i].expert);
    bin_load[best] += inst[i].share;
  }
  return -1;
}

// Instance lists from per-rank expert sets: increasing rank, `current`'s primary first if kept.
ExpertPlacement from_rank_sets(const std::vector<std::vector<int>>& held,
                               const ExpertPlacement& current) {
  std::vector<std::vector<int>> ranks(static_cast<size_t>(current.n_experts()));
  for (size_t r = 0; r < held.size(); ++r)
    for (int e : held[r]) ranks[static_cast<size_t>(e)].push_back(static_cast<int>(r));
  for (int e = 0; e < current.n_experts(); ++e) {
    std::vector<int>& rs = ranks[static_cast<size_t>(e)];
    std::sort(rs.begin(), rs.end());
    auto it = std::find(rs.begin(), rs.end(), current.owner(e));
    if (it != rs.end()) std::rotate(rs.begin(), it, it + 1);
  }
  return ExpertPlacement::from_instances(ranks, static_cast<int>(held.size()));
}

// Few moves from `current` (same instances): while it lowers the larger of the two loads, move
// one instance from the busiest to the least-loaded rank, or swap a hotter one there for a
// cooler one (ties: the smaller share moved). Each step lowers the sum of squared rank loads,
// so it ends.
ExpertPlacement local_search(const std::vector<double>& load, const ExpertPlacement& current,
                             int min_per, int cap) {
  const int E = current.n_experts(), P = current.n_ranks();
  std::vector<std::vector<int>> held(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r) held[r] = current.local_experts(r);
  std::vector<double> share(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) share[e] = load[e] / current.n_instances(e);
  std::vector<double> rl = rank_loads(load, current);
  auto holds = [&](int r, int e) {
    return std::find(held[r].begin(), held[r].end(), e) != held[r].end();
  };
  for (int it = 0; it < 4 * (E + P); ++it) {
    const int hi = static_cast<int>(std::max_element(rl.begin(), rl.end()) - rl.begin());
    const int lo = static_cast<int>(std::min_element(rl.begin(), rl.end()) - rl.begin());
    if (hi == lo) break;
    double best = rl[hi] * (1 - 1e-12), best_moved = 0;
    int bx = -1, by = -1;  // by = -1: a move, not a swap
    auto consider = [&](int x, int y) {
      const double d = share[x] - (y >= 0 ? share[y] : 0.0);
      const double m = std::max(rl[hi] - d, rl[lo] + d);
      const double moved = share[x] + (y >= 0 ? share[y] : 0.0);
      if (m < best || (bx >= 0 && m == best && moved < best_moved)) {
        best = m, best_moved = moved, bx = x, by = y;
      }
    };
    for (int x : held[hi]) {
      if (holds(lo, x)) continue;
      if (static_cast<int>(held[hi].size()) > min_per && static_cast<int>(held[lo].size()) < cap)
        consider(x, -1);
      for (int y : held[lo])
        if (!holds(hi, y) && share[x] > share[y]) consider(x, y);
    }
    if (bx < 0) break;
    held[hi].erase(std::find(held[hi].begin(), held[hi].end(), bx));
    held[lo].push_back(bx);
    rl[hi] -= share[bx];
    rl[lo] += share[bx];
    if (by >= 0) {
      held[lo].erase(std::find(held[lo].begin(), held[lo].end(), by));
      held[hi].push_back(by);
      rl[lo] -= share[by];
      rl[hi] += share[by];
    }
  }
  return from_rank_sets(held, current);
}

}  // namespace

double rank_imbalance(const std::vector<double>& load, const ExpertPlacement& placement) {
  return max_over_mean(rank_loads(load, placement));
}

int expert_cap(const RebalanceOptions& options, int n_experts, int n_ranks) {
  if (options.max_experts_per_rank > 0) return options.max_experts_per_rank;
  return 2 * ((n_experts + n_ranks - 1) / std::max(1, n_ranks));
}

void check_expert_cap(const RebalanceOptions& options, int n_experts, int n_ranks) {
  const int need = (n_experts + n_ranks - 1) / std::max(1, n_ranks);
  const int cap = expert_cap(options, n_experts, n_ranks);
  if (cap < need)
    throw Error(ErrorKind::kConfig,
                cat("comm.rebalance.max_experts_per_rank = ", cap, " cannot place ", n_experts,
                    " experts on ", n_ranks, " ranks: a rank must hold up to ceil(", n_experts,
                    " / ", n_ranks, ") = ", need, "; set it to at least ", need,
                    " (0 = the default, ", 2 * need, ")"));
}

int max_instances(const ExpertPlacement& placement) {
  int most = 0;
  for (int r = 0; r < placement.n_ranks(); ++r) most = std::max(most, placement.n_local(r));
  return most;
}

PlacementPlan plan_placement(const std::vector<double>& load, const ExpertPlacement& current,
                             const RebalanceOptions& options) {
  const int E = current.n_experts(), P = current.n_ranks();
  MOE_CHECK(static_cast<int>(load.size()) == E, "rebalance: ", load.size(), " loads for ", E,
            " experts");
  const int min_per = std::max(1, options.min_experts_per_rank);
  check_expert_cap(options, E, P);
  const int cap = expert_cap(options, E, P);
  if (int64_t(P) * min_per > int64_t(E) + std::max(0, options.replicas) || min_per > cap)
    throw Error(ErrorKind::kConfig, cat("rebalance: ", P, " ranks x ", min_per,
                                        " experts each exceed the ", E, " experts"));
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  PlacementPlan out;
  out.placement = current;
  out.cap = cap;
  out.instances_before = out.instances_after = max_instances(current);
  const std::vector<double> before = rank_loads(load, current);
  out.max_before = out.max_after = *std::max_element(before.begin(), before.end());
  out.imbalance_before = out.imbalance_after = max_over_mean(before);
  if (!(total > 0.0)) return out;

  // 1. Replicas for the experts whose share exceeds the ideal rank load, while the instances
  // fit under the cap.
  std::vector<int> n_inst(static_cast<size_t>(E), 1);
  const double ideal = total / P;
  for (int i = 0; i < options.replicas && E + i < int64_t(P) * cap; ++i) {
    int best = -1;
    for (int e = 0; e < E; ++e)
      if (n_inst[e] < P && (best < 0 || load[e] / n_inst[e] > load[best] / n_inst[best])) best = e;
    // (a relative margin, so that rounding in the sums never buys a useless replica)
    if (best < 0 || !(load[best] / n_inst[best] > ideal * (1 + 1e-9))) break;
    ++n_inst[best];
  }

  // 2. Instances into bins; a replica no bin with room can take is dropped, and the fill
  // repeated with the shares that leaves.
  std::vector<std::vector<int>> bins;
  std::vector<double> bin_load;
  bool matched = false;
  for (;;) {
    bins.assign(static_cast<size_t>(P), {});
    bin_load.assign(static_cast<size_t>(P), 0.0);
    std::vector<Instance> inst;
    for (int e = 0; e < E; ++e)
      for (int i = (options.policy == RebalancePolicy::kReplicate ? 1 : 0); i < n_inst[e]; ++i)
        inst.push_back({e, load[e] / n_inst[e]});
    std::stable_sort(inst.begin(), inst.end(),
                     [](const Instance& a, const Instance& b) { return a.share > b.share; });
    if (options.policy == RebalancePolicy::kReplicate) {  // primaries stay, in rank order
      for (int e = 0; e < E; ++e) {
        bins[current.owner(e)].push_back(e);
        bin_load[current.owner(e)] += load[e] / n_inst[e];
      }
      matched = true;  // bins are ranks already
    }
    const int stuck = lpt_fill(inst, min_per, cap, bins, bin_load);
    if (stuck < 0) break;
    // A first instance always finds room (at most P C instances), so this is a replica.
    MOE_CHECK(n_inst[stuck] > 1, "rebalance: no rank can take expert ", stuck);
    --n_inst[stuck];
  }

  // 3. Bins to ranks by overlap with what each rank holds now.
  std::vector<int> bin_rank(static_cast<size_t>(P), -1);
  if (matched) {
    std::iota(bin_rank.begin(), bin_rank.end(), 0);
  } else {
    std::vector<int> overlap(static_cast<size_t>(P) * P, 0);  // [bin][rank]
    for (int b = 0; b < P; ++b)
      for (int e : bins[b])
        for (int r : current.instances(e)) ++overlap[size_t(b) * P + r];
    std::vector<uint8_t> rank_used(static_cast<size_t>(P), 0);
    for (int n = 0; n < P; ++n) {
      int bb = -1, br = -1;
      for (int b = 0; b < P; ++b) {
        if (bin_rank[b] >= 0) continue;
        for (int r = 0; r < P; ++r)
          if (!rank_used[r] &&
              (bb < 0 || overlap[size_t(b) * P + r] > overlap[size_t(bb) * P + br]))
            bb = b, br = r;
      }
      bin_rank[bb] = br;
      rank_used[br] = 1;
    }
  }

  // Instances per expert: the current primary first if it keeps one, then increasing rank.
  std::vector<std::vector<int>> ranks(static_cast<size_t>(E));
  for (int b = 0; b < P; ++b)
    for (int e : bins[b]) ranks[e].push_back(bin_rank[b]);
  for (int e = 0; e < E; ++e) {
    std::vector<int>& rs = ranks[e];
    std::sort(rs.begin(), rs.end());
    auto it = std::find(rs.begin(), rs.end(), current.owner(e));
    if (it != rs.end()) std::rotate(rs.begin(), it, it + 1);
  }
  ExpertPlacement next = ExpertPlacement::from_instances(ranks, P);
  // With the same instances as now, a few moves from the current map often do as well: take
  // them when they move no more experts, unless the fresh placement is better by min_gain.
  bool same_instances = options.policy == RebalancePolicy::kLpt;
  for (int e = 0; e < E && same_instances; ++e)
    same_instances = n_inst[e] == current.n_instances(e);
  if (same_instances) {
    ExpertPlacement near = local_search(load, current, min_per, cap);
    const std::vector<double> a = rank_loads(load, next), b = rank_loads(load, near);
    auto moves = [&](const ExpertPlacement& p) {
      int n = 0;
      for (int e = 0; e < E; ++e)
        for (int r : p.instances(e)) n += current.slot_on(e, r) < 0;
      return n;
    };
    if (*std::max_element(b.begin(), b.end()) <=
            *std::max_element(a.begin(), a.end()) * (1.0 + options.min_gain) &&
        moves(near) <= moves(next) && max_instances(near) <= cap)
      next = std::move(near);
  }
  const std::vector<double> after = rank_loads(load, next);
  const double max_after = *std::max_element(after.begin(), after.end());
  // 4. Keep the current map unless the gain is worth a migration, or it exceeds the cap (a
  // map from a checkpoint of another cap or policy) and the new one holds fewer.
  const bool over_cap = out.instances_before > cap && max_instances(next) < out.instances_before;
  if (next == current || (!over_cap && !(max_after * (1.0 + options.min_gain) <= out.max_before)))
    return out;
  out.placement = std::move(next);
  out.changed = true;
  out.max_after = max_after;
  out.imbalance_after = max_over_mean(after);
  out.instances_after = max_instances(out.placement);
  return out;
}

LoadTracker::LoadTracker(int n_layers, int n_experts, double decay)
    : decay_(decay),
      ema_(static_cast<size_t>(n_layers), std::vector<double>(static_cast<size_t>(n_experts), 0.0)),
      step_(ema_) {}

LoadTracker::LoadTracker(const std::vector<int>& experts, double decay) : decay_(decay) {
  for (int e : experts) ema_.emplace_back(static_cast<size_t>(e), 0.0);
  step_ = ema_;
}

void LoadTracker::add(int layer, const std::vector<int64_t>& expert_tokens) {
  std::vector<double>& s = step_[static_cast<size_t>(layer)];
  for (size_t e = 0; e < s.size() && e < expert_tokens.size(); ++e)
    s[e] += static_cast<double>(expert_tokens[e]);
}

void LoadTracker::end_step() {
  for (size_t l = 0; l < ema_.size(); ++l)
    for (size_t e = 0; e < ema_[l].size(); ++e) {
      ema_[l][e] = steps_ == 0 ? step_[l][e] : decay_ * ema_[l][e] + (1.0 - decay_) * step_[l][e];
      step_[l][e] = 0.0;
    }
  ++steps_;
}

void LoadTracker::restore(std::vector<std::vector<double>> ema, int64_t steps) {
  if (ema.size() != ema_.size())
    throw Error(ErrorKind::kData,
                cat("load averages of ", ema.size(), " layers, the tracker has ", ema_.size()));
  for (size_t l = 0; l < ema.size(); ++l)
    if (ema[l].size() != ema_[l].size())
      throw Error(ErrorKind::kData, cat("load averages of layer ", l, " have ", ema[l].size(),
                                        " experts, the tracker ", ema_[l].size()));
  ema_ = std::move(ema);
  for (auto& s : step_) std::fill(s.begin(), s.end(), 0.0);
  steps_ = steps;
}

MigrationPlan plan_migration(const ExpertPlacement& from, const ExpertPlacement& to, int rank) {
  MOE_CHECK(from.n_experts() == to.n_experts() && from.n_ranks() == to.n_ranks(),
            "migrate: placements differ in shape");
  MigrationPlan plan;
  // Every rank walks the same list of new instances, in (rank, slot) order.
  for (int r = 0; r < to.n_ranks(); ++r)
    for (int j = 0; j < to.n_local(r); ++j) {
      const int e = to.local_experts(r)[j];
      const int held = from.slot_on(e, r);
      if (r == rank && held >= 0)
        plan.keeps.push_back({e, held, j});
      else if (r == rank)
        plan.recvs.push_back({e, j, from.owner(e)});
      else if (held < 0 && from.owner(e) == rank)
        plan.sends.push_back({e, from.slot(e), r});
    }
  return plan;
}

MigrationStats migrate_experts(const MigrationPlan& plan, int64_t F, const float* send_rows,
                               float* recv_rows, const Communicator& comm) {
  if (F > kMaxMpiCount)
    throw Error(
        ErrorKind::kComm,
        cat("migrate: ", F, " floats per expert exceed the MPI count limit ", kMaxMpiCount));
  MigrationStats st;
  std::vector<MPI_Request> req(plan.sends.size() + plan.recvs.size());
  size_t n = 0;
  for (size_t i = 0; i < plan.recvs.size(); ++i) {
    const auto& r = plan.recvs[i];
    MOE_MPI_CHECK(MPI_Irecv(recv_rows + i * size_t(F), int(F), MPI_FLOAT, r.source, r.expert,
                            comm.raw(), &req[n++]),
                  "migrate: receive expert");
    ++st.experts_received;
    st.bytes_received += F * 4;
  }
  for (size_t i = 0; i < plan.sends.size(); ++i) {
    const auto& s = plan.sends[i];
    MOE_MPI_CHECK(MPI_Isend(send_rows + i * size_t(F), int(F), MPI_FLOAT, s.dest, s.expert,
                            comm.raw(), &req[n++]),
                  "migrate: send expert");
    ++st.experts_sent;
    st.bytes_sent += F * 4;
  }
  MOE_MPI_CHECK(MPI_Waitall(int(n), req.data(), MPI_STATUSES_IGNORE), "migrate: wait");
  return st;
}

ReplicaGroups::ReplicaGroups(const ExpertPlacement& placement, const Communicator& comm)
    : groups_(static_cast<size_t>(placement.n_experts()), MPI_COMM_NULL) {
  for (int e = 0; e < placement.n_experts(); ++e) {
    if (placement.n_instances(e) < 2) continue;
    const bool in = placement.slot_on(e, comm.rank()) >= 0;
    MPI_Comm c = MPI_COMM_NULL;
    MOE_MPI_CHECK(MPI_Comm_split(comm.raw(), in ? 0 : MPI_UNDEFINED, comm.rank(), &c),
                  "replica group split");
    if (c != MPI_COMM_NULL) {
      MOE_MPI_CHECK(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN), "replica group errhandler");
      groups_[e] = c;
    }
  }
}

ReplicaGroups::~ReplicaGroups() {
  release();
}

void ReplicaGroups::release() {
  for (MPI_Comm& c : groups_)
    if (c != MPI_COMM_NULL) MPI_Comm_free(&c);
  groups_.clear();
}

ReplicaGroups::ReplicaGroups(ReplicaGroups&& o) noexcept : groups_(std::move(o.groups_)) {
  o.groups_.clear();
}

ReplicaGroups& ReplicaGroups::operator=(ReplicaGroups&& o) noexcept {
  if (this != &o) {
    release();
    groups_ = std::move(o.groups_);
    o.groups_.clear();
  }
  return *this;
}

bool ReplicaGroups::member(int expert) const {
  return expert >= 0 && expert < static_cast<int>(groups_.size()) &&
         groups_[static_cast<size_t>(expert)] != MPI_COMM_NULL;
}

void ReplicaGroups::sum(int expert, float* data, int64_t n, const char* what) const {
  MOE_CHECK(member(expert), what, ": not in the replica group of expert ", expert);
  MOE_CHECK(n <= kMaxMpiCount, what, ": ", n, " floats exceed the MPI count limit");
  MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data, int(n), MPI_FLOAT, MPI_SUM,
                              groups_[static_cast<size_t>(expert)]),
                what);
}

}  // namespace moe::comm
