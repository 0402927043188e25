// DispatchPlan and Exchange under mpirun -np 1, 2 and 4: identity round trips, the adjoint
// identity, non-blocking == blocking bitwise, capacity drops that do not depend on the rank
// count, degenerate loads, global load statistics, the node-local shared-memory path
// (dispatch_shared / combine_shared) bitwise equal to the MPI path, and the hierarchical
// (node-aware) path bitwise equal to the flat one on every forced node layout the rank count
// allows (np 4: 1x4, 2x2, 4x1; np 2: 1x2, 2x1; np 1: 1x1), with its traffic counts, and all of
// it again at a size where the row copies use streaming stores.
//
// Global routings are built from a seed on every rank; each rank takes a contiguous share of the
// global tokens, so results can be compared with what a single rank would decide.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/exchange.hpp"
#include "comm/placement.hpp"
#include "comm/plan.hpp"
#include "runtime/tensor.hpp"

using moe::ConstView;
using moe::Error;
using moe::ErrorKind;
using moe::Tensor;
using moe::View;
using namespace moe::comm;

namespace {

// A routing of the whole global batch: expert[g*k + j], weight[g*k + j].
struct GlobalRouting {
  int64_t n_tokens = 0;
  int k = 0;
  std::vector<int32_t> expert;
  std::vector<float> weight;
};

// Random routing; `hot` > 0 sends that fraction of slots to expert 0 (to force drops); weights
// are multiples of 1/8 when `coarse` (many ties), else uniform.
GlobalRouting random_routing(uint64_t seed, int64_t G, int k, int E, double empty = 0.0,
                             double hot = 0.0, bool coarse = false) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  GlobalRouting r{G, k, std::vector<int32_t>(size_t(G * k)), std::vector<float>(size_t(G * k))};
  for (int64_t s = 0; s < G * k; ++s) {
    double a = u(rng), b = u(rng), c = u(rng);
    r.expert[s] = a < empty ? -1 : (b < hot ? 0 : int32_t(c * E) % E);
    r.weight[s] = coarse ? float(std::floor(u(rng) * 8) / 8) : float(u(rng));
  }
  return r;
}

// This rank's contiguous share [begin, end) of G tokens. With `starve` >= 0 that rank gets none.
std::pair<int64_t, int64_t> share(int64_t G, const Communicator& comm, int starve = -1) {
  std::vector<int64_t> n(size_t(comm.size()), 0);
  int takers = comm.size() - (starve >= 0 && comm.size() > 1 ? 1 : 0);
  for (int r = 0, i = 0; r < comm.size(); ++r) {
    if (r == starve && comm.size() > 1) continue;
    n[r] = G / takers + (i < G % takers ? 1 : 0);
    ++i;
  }
  int64_t begin = 0;
  for (int r = 0; r < comm.rank(); ++r) begin += n[r];
  return {begin, begin + n[comm.rank()]};
}

RoutingView local_view(const GlobalRouting& g, std::pair<int64_t, int64_t> range) {
  const int64_t b = range.first;
  return RoutingView{range.second - b, g.k, g.expert.data() + b * g.k, g.weight.data() + b * g.k};
}

// Token rows that say who they are: x[t][c] = global token * 64 + c (exact in fp32).
Tensor token_rows(std::pair<int64_t, int64_t> range, int64_t d) {
  Tensor x = Tensor::zeros({std::max<int64_t>(range.second - range.first, 0), d});
  for (int64_t t = 0; t < range.second - range.first; ++t)
    for (int64_t c = 0; c < d; ++c) x[t * d + c] = float((range.first + t) * 64 + c);
  return x;
}

Tensor random_rows(uint64_t seed, int64_t n, int64_t d) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Tensor t = Tensor::zeros({n, d});
  for (int64_t i = 0; i < n * d; ++i) t[i] = u(rng);
  return t;
}

// A [rows, d] view that is valid even for zero rows.
View rows_view(Tensor& t, int64_t rows, int64_t d) {
  return View(t.data(), rows, d);
}

// Reference capacity decision over the global batch: for each expert, sort its slots by
// (weight descending, global slot ascending) and keep the first `cap`.
std::vector<uint8_t> reference_kept(const GlobalRouting& g, int E, int64_t cap) {
  std::vector<uint8_t> kept(g.expert.size(), 0);
  for (int e = 0; e < E; ++e) {
    std::vector<int64_t> s;
    for (int64_t i = 0; i < int64_t(g.expert.size()); ++i)
      if (g.expert[i] == e) s.push_back(i);
    std::stable_sort(s.begin(), s.end(),
                     [&](int64_t a, int64_t b) { return g.weight[a] > g.weight[b]; });
    for (int64_t i = 0; i < int64_t(s.size()); ++i) kept[s[i]] = i < cap ? 1 : 0;
  }
  return kept;
}

// This rank's kept mask placed into a global [G*k] mask, summed over ranks.
std::vector<int> global_kept(const DispatchPlan& plan, std::pair<int64_t, int64_t> range, int k,
                             int64_t G, const Communicator& comm) {
  std::vector<int> all(size_t(G * k), 0);
  for (int64_t s = 0; s < plan.n_tokens() * k; ++s) all[range.first * k + s] = plan.kept()[s];
  comm.allreduce_sum(all.data(), int64_t(all.size()));
  return all;
}

// Dispatch token rows, check every expert group holds exactly the (token, slot)s routed to it in
// global order, pass through identity experts, combine, and check every kept slot got its own
// token's row back and every other slot zeros.
void check_round_trip(const GlobalRouting& g, const ExpertPlacement& placement,
                      const DispatchPlan& plan, std::pair<int64_t, int64_t> range,
                      const Communicator& comm, int64_t d) {
  const int k = g.k;
  const int64_t T = range.second - range.first;
  Tensor x = token_rows(range, d);
  Tensor expert_in = Tensor::zeros({std::max<int64_t>(plan.n_recv(), 1), d});
  Exchange ex(comm, "test");
  ex.dispatch(plan, ConstView(x.data(), T, d), rows_view(expert_in, plan.n_recv(), d));

  // The global kept mask, to know which global slots each expert should hold.
  std::vector<int> kept = global_kept(plan, range, k, g.n_tokens, comm);
  const std::vector<int>& mine = placement.local_experts(comm.rank());
  ASSERT_EQ(int64_t(plan.recv_offsets().size()), int64_t(mine.size()) + 1);
  for (size_t e = 0; e < mine.size(); ++e) {
    std::vector<int64_t> want;
    for (int64_t s = 0; s < g.n_tokens * k; ++s)
      if (g.expert[s] == mine[e] && kept[s]) want.push_back(s / k);
    const int64_t b = plan.recv_offsets()[e], n = plan.recv_offsets()[e + 1] - b;
    ASSERT_EQ(n, int64_t(want.size())) << "expert " << mine[e];
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(expert_in[(b + i) * d], float(want[i] * 64))
          << "expert " << mine[e] << " row " << i;
      ASSERT_EQ(expert_in[(b + i) * d + d - 1], float(want[i] * 64 + d - 1));
    }
  }

  Tensor slot_out = Tensor::zeros({std::max<int64_t>(T * k, 1), d});
  slot_out.fill(-7.0f);  // combine must overwrite every slot, dropped ones with zeros
  ex.combine(plan, ConstView(expert_in.data(), plan.n_recv(), d), rows_view(slot_out, T * k, d));
  for (int64_t s = 0; s < T * k; ++s) {
    const bool keep = plan.kept()[s];
    EXPECT_EQ(keep, kept[range.first * k + s] != 0);
    for (int64_t c = 0; c < d; ++c) {
      const float want = keep ? float((range.first + s / k) * 64 + c) : 0.0f;
      ASSERT_EQ(slot_out[s * d + c], want) << "slot " << s << " col " << c;
    }
  }
}

LoadStats reference_stats(const GlobalRouting& g, const ExpertPlacement& p,
                          const std::vector<int>& kept) {
  LoadStats st;
  st.expert_tokens.assign(size_t(p.n_experts()), 0);
  st.rank_tokens.assign(size_t(p.n_ranks()), 0);
  for (size_t s = 0; s < g.expert.size(); ++s) {
    if (g.expert[s] < 0) continue;
    ++st.slots_total;
    if (!kept[s]) {
      ++st.slots_dropped;
      continue;
    }
    ++st.expert_tokens[g.expert[s]];
    ++st.rank_tokens[p.owner(g.expert[s])];
  }
  return st;
}

void expect_stats(const LoadStats& got, const LoadStats& want) {
  EXPECT_EQ(got.expert_tokens, want.expert_tokens);
  EXPECT_EQ(got.rank_tokens, want.rank_tokens);
  EXPECT_EQ(got.slots_total, want.slots_total);
  EXPECT_EQ(got.slots_dropped, want.slots_dropped);
  auto imb = [](const std::vector<int64_t>& v) {
    int64_t sum = 0, mx = 0;
    for (int64_t x : v) sum += x, mx = std::max(mx, x);
    return sum ? double(mx) * v.size() / sum : 0.0;
  };
  EXPECT_DOUBLE_EQ(got.expert_imbalance, imb(want.expert_tokens));
  EXPECT_DOUBLE_EQ(got.rank_imbalance, imb(want.rank_tokens));
  EXPECT_DOUBLE_EQ(got.drop_rate(),
                   want.slots_total ? double(want.slots_dropped) / want.slots_total : 0.0);
}

}  // namespace

TEST(Exchange, DroplessRoundTripReturnsEachTokenInEverySlot) {
  Communicator w = Communicator::world();
  for (int k : {1, 2}) {
    const int E = 8;
    GlobalRouting g = random_routing(11 + k, 103, k, E, /*empty=*/0.1);
    ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
    auto range = share(g.n_tokens, w);
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
    EXPECT_EQ(plan.capacity(), 0);
    check_round_trip(g, p, plan, range, w, 5);
    std::vector<int> all_kept(g.expert.size());
    for (size_t s = 0; s < g.expert.size(); ++s) all_kept[s] = g.expert[s] >= 0;
    expect_stats(plan.stats(), reference_stats(g, p, all_kept));
    EXPECT_EQ(plan.stats().slots_dropped, 0);
  }
}

TEST(Exchange, InterleavedPlacementRoundTrip) {
  Communicator w = Communicator::world();
  const int E = 6;
  std::vector<int> owner(E);
  for (int e = 0; e < E; ++e) owner[e] = (E - 1 - e) % w.size();  // reversed, interleaved
  ExpertPlacement p = ExpertPlacement::from_owners(owner, w.size());
  GlobalRouting g = random_routing(5, 57, 2, E, 0.05);
  auto range = share(g.n_tokens, w);
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  check_round_trip(g, p, plan, range, w, 3);
}

TEST(Exchange, AdjointDispatchAndCombine) {
  Communicator w = Communicator::world();
  const int E = 8, k = 2;
  const int64_t d = 16;
  GlobalRouting g = random_routing(3, 77, k, E, 0.1);
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  for (double cf : {0.0, 0.75}) {
    auto range = share(g.n_tokens, w);
    const int64_t T = range.second - range.first;
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {cf}, w);
    const int64_t R = plan.n_recv();
    Tensor x = random_rows(100 + w.rank(), std::max<int64_t>(T, 1), d);
    Tensor s = random_rows(200 + w.rank(), std::max<int64_t>(T * k, 1), d);
    Tensor y = random_rows(300 + w.rank(), std::max<int64_t>(R, 1), d);
    Tensor dx = Tensor::zeros({std::max<int64_t>(R, 1), d});
    Tensor ds = Tensor::zeros({std::max<int64_t>(R, 1), d});
    Tensor cy = Tensor::zeros({std::max<int64_t>(T * k, 1), d});
    Exchange ex(w);
    ex.dispatch(plan, ConstView(x.data(), T, d), rows_view(dx, R, d));
    ex.dispatch_slots(plan, ConstView(s.data(), T * k, d), rows_view(ds, R, d));
    ex.combine(plan, ConstView(y.data(), R, d), rows_view(cy, T * k, d));
    // <dispatch x, y> = <x, sum_j combine(y)_j>;  <dispatch_slots s, y> = <s, combine y>.
    double lhs[2] = {0, 0}, rhs[2] = {0, 0};
    for (int64_t i = 0; i < R * d; ++i) {
      lhs[0] += double(dx[i]) * y[i];
      lhs[1] += double(ds[i]) * y[i];
    }
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j)
        for (int64_t c = 0; c < d; ++c) {
          rhs[0] += double(x[t * d + c]) * cy[(t * k + j) * d + c];
          rhs[1] += double(s[(t * k + j) * d + c]) * cy[(t * k + j) * d + c];
        }
    w.allreduce_sum(lhs, 2);
    w.allreduce_sum(rhs, 2);
    EXPECT_NEAR(lhs[0], rhs[0], 1e-10 * std::max(1.0, std::abs(rhs[0]))) << "cf " << cf;
    EXPECT_NEAR(lhs[1], rhs[1], 1e-10 * std::max(1.0, std::abs(rhs[1]))) << "cf " << cf;
    EXPECT_NE(lhs[0], 0.0);
  }
}

TEST(Exchange, NonBlockingEqualsBlockingBitwise) {
  Communicator w = Communicator::world();
  const int E = 4, k = 2;
  const int64_t d = 33;
  GlobalRouting g = random_routing(21, 150, k, E, 0.1);
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  auto range = share(g.n_tokens, w);
  const int64_t T = range.second - range.first;
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  const int64_t R = plan.n_recv();
  Tensor x = random_rows(7 + w.rank(), std::max<int64_t>(T, 1), d);
  Tensor s = random_rows(8 + w.rank(), std::max<int64_t>(T * k, 1), d);
  Tensor y = random_rows(9 + w.rank(), std::max<int64_t>(R, 1), d);
  auto fresh = [&](int64_t n) {
    Tensor t = Tensor::zeros({std::max<int64_t>(n, 1), d});
    t.fill(3.5f);
    return t;
  };
  Tensor a1 = fresh(R), a2 = fresh(R), b1 = fresh(R), b2 = fresh(R), c1 = fresh(T * k),
         c2 = fresh(T * k);
  Exchange flat(w, "flat"), chunked(w, "chunked");
  for (int rep = 0; rep < 2; ++rep) {  // twice: buffers are reused
    flat.dispatch(plan, ConstView(x.data(), T, d), rows_view(a1, R, d));
    flat.dispatch_slots(plan, ConstView(s.data(), T * k, d), rows_view(b1, R, d));
    flat.combine(plan, ConstView(y.data(), R, d), rows_view(c1, T * k, d));
    // A dispatch and a combine in flight together, waited in the other order.
    chunked.dispatch_start(plan, ConstView(x.data(), T, d));
    chunked.combine_start(plan, ConstView(y.data(), R, d));
    chunked.combine_wait(plan, rows_view(c2, T * k, d));
    chunked.dispatch_wait(plan, rows_view(a2, R, d));
    chunked.dispatch_slots_start(plan, ConstView(s.data(), T * k, d));
    chunked.dispatch_wait(plan, rows_view(b2, R, d));
    EXPECT_EQ(std::memcmp(a1.data(), a2.data(), sizeof(float) * R * d), 0);
    EXPECT_EQ(std::memcmp(b1.data(), b2.data(), sizeof(float) * R * d), 0);
    EXPECT_EQ(std::memcmp(c1.data(), c2.data(), sizeof(float) * T * k * d), 0);
  }
  EXPECT_EQ(flat.stats().bytes_sent, chunked.stats().bytes_sent);
  EXPECT_EQ(flat.stats().bytes_received, chunked.stats().bytes_received);
  if (w.size() == 1) {
    EXPECT_EQ(flat.stats().bytes_sent, 0);  // rows to self never hit MPI
  }
}

TEST(Exchange, StridedViewsOnSomeRanksOnly) {
  // Even ranks pass expert rows with a row stride above d, odd ranks contiguous ones: every
  // rank must still take the same message protocol, and the results equal contiguous calls.
  Communicator w = Communicator::world();
  const int E = 4, k = 2;
  const int64_t d = 9, ld = w.rank() % 2 == 0 ? d + 3 : d;
  GlobalRouting g = random_routing(23, 120, k, E, 0.1);
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  auto range = share(g.n_tokens, w);
  const int64_t T = range.second - range.first;
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  const int64_t R = plan.n_recv();
  Tensor x = random_rows(31 + w.rank(), std::max<int64_t>(T, 1), d);
  Tensor y = random_rows(32 + w.rank(), std::max<int64_t>(R, 1), d);
  Tensor a1 = Tensor::zeros({std::max<int64_t>(R, 1), d});
  Tensor a2 = Tensor::zeros({std::max<int64_t>(R, 1), ld});
  Tensor ys = Tensor::zeros({std::max<int64_t>(R, 1), ld});
  for (int64_t i = 0; i < R; ++i)
    std::memcpy(ys.data() + i * ld, y.data() + i * d, sizeof(float) * d);
  Tensor c1 = Tensor::zeros({std::max<int64_t>(T * k, 1), d});
  Tensor c2 = Tensor::zeros({std::max<int64_t>(T * k, 1), d});
  Exchange ex(w, "strided");
  ex.dispatch(plan, ConstView(x.data(), T, d), rows_view(a1, R, d));
  ex.dispatch(plan, ConstView(x.data(), T, d), View(a2.data(), R, d, ld));
  for (int64_t i = 0; i < R; ++i)
    EXPECT_EQ(std::memcmp(a1.data() + i * d, a2.data() + i * ld, sizeof(float) * d), 0) << i;
  ex.combine(plan, ConstView(y.data(), R, d), rows_view(c1, T * k, d));
  ex.combine(plan, ConstView(ys.data(), R, d, ld), rows_view(c2, T * k, d));
  EXPECT_EQ(std::memcmp(c1.data(), c2.data(), sizeof(float) * T * k * d), 0);
}

TEST(Exchange, CapacityHandBuiltDrops) {
  Communicator w = Communicator::world();
  // E = 4 experts, 8 global tokens, k = 2, capacity factor 1: cap = ceil(1 * 2 * 8 / 4) = 4.
  // Tokens 0..5: slot 0 -> expert 0 with weight a[t], slot 1 -> expert 1 with weight b[t].
  //   expert 0 keeps 0.9 (t0), 0.7 (t4), 0.5 (t2), 0.25 (t1 beats t3 on the tie); drops t3, t5.
  //   expert 1 keeps 0.875 (t5), 0.75 (t1), 0.75 (t3), 0.5 (t2); drops t0 (0.125), t4 (0.25).
  // Tokens 6, 7: slot 0 -> experts 2, 3; slot 1 empty.
  const float a[6] = {0.9f, 0.25f, 0.5f, 0.25f, 0.7f, 0.125f};
  const float b[6] = {0.125f, 0.75f, 0.5f, 0.75f, 0.25f, 0.875f};
  GlobalRouting g{8, 2, std::vector<int32_t>(16), std::vector<float>(16)};
  for (int t = 0; t < 6; ++t) {
    g.expert[t * 2] = 0, g.weight[t * 2] = a[t];
    g.expert[t * 2 + 1] = 1, g.weight[t * 2 + 1] = b[t];
  }
  g.expert[12] = 2, g.weight[12] = 1.0f, g.expert[13] = -1, g.weight[13] = 0.0f;
  g.expert[14] = 3, g.weight[14] = 1.0f, g.expert[15] = -1, g.weight[15] = 0.0f;
  const std::vector<int> want_dropped = {3 * 2, 5 * 2, 0 * 2 + 1, 4 * 2 + 1};

  ExpertPlacement p = ExpertPlacement::blocked(4, w.size());
  auto range = share(g.n_tokens, w);
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {1.0}, w);
  EXPECT_EQ(plan.capacity(), 4);
  std::vector<int> kept = global_kept(plan, range, 2, g.n_tokens, w);
  for (int s = 0; s < 16; ++s) {
    const bool dropped = std::count(want_dropped.begin(), want_dropped.end(), s) > 0;
    EXPECT_EQ(kept[s], (g.expert[s] >= 0 && !dropped) ? 1 : 0) << "global slot " << s;
  }
  EXPECT_EQ(plan.stats().slots_total, 14);
  EXPECT_EQ(plan.stats().slots_dropped, 4);
  EXPECT_DOUBLE_EQ(plan.stats().drop_rate(), 4.0 / 14.0);
  EXPECT_EQ(plan.stats().expert_tokens, (std::vector<int64_t>{4, 4, 1, 1}));
  EXPECT_DOUBLE_EQ(plan.stats().expert_imbalance, 4.0 * 4 / 10);
  check_round_trip(g, p, plan, range, w, 4);
}

TEST(Exchange, CapacityDecisionDoesNotDependOnRankCount) {
  Communicator w = Communicator::world();
  const int E = 8, k = 2;
  // Skewed (40% of slots to expert 0) with coarse weights, so drops and ties are plentiful.
  GlobalRouting g = random_routing(42, 301, k, E, 0.05, 0.4, /*coarse=*/true);
  for (double cf : {0.5, 1.0, 1.25}) {
    ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
    auto range = share(g.n_tokens, w);
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {cf}, w);
    std::vector<int> kept = global_kept(plan, range, k, g.n_tokens, w);
    const int64_t cap = int64_t(std::ceil(cf * k * g.n_tokens / E));
    EXPECT_EQ(plan.capacity(), cap);
    std::vector<uint8_t> want = reference_kept(g, E, cap);
    for (size_t s = 0; s < want.size(); ++s) ASSERT_EQ(kept[s], want[s]) << "slot " << s;
    expect_stats(plan.stats(), reference_stats(g, p, kept));
    EXPECT_GT(plan.stats().slots_dropped, 0);

    // The same global tokens on sub-communicators of 1 and (when P = 4) 2 ranks.
    for (int group : {1, 2}) {
      if (group > w.size() || w.size() % group) continue;
      Communicator sub = w.split(w.rank() / group, w.rank());
      ExpertPlacement sp = ExpertPlacement::blocked(E, sub.size());
      auto srange = share(g.n_tokens, sub);
      DispatchPlan splan = DispatchPlan::build(local_view(g, srange), sp, {cf}, sub);
      std::vector<int> skept = global_kept(splan, srange, k, g.n_tokens, sub);
      EXPECT_EQ(skept, kept) << "group of " << group << ", cf " << cf;
      EXPECT_EQ(splan.stats().expert_tokens, plan.stats().expert_tokens);
      check_round_trip(g, sp, splan, srange, sub, 2);
    }
  }
}

TEST(Exchange, AllTokensToOneExpertAndARankWithNoTokens) {
  Communicator w = Communicator::world();
  const int E = 4, k = 2;
  GlobalRouting g{64, k, std::vector<int32_t>(128, 0), std::vector<float>(128, 0.5f)};
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  for (int starve : {-1, w.size() - 1}) {
    auto range = share(g.n_tokens, w, starve);
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
    check_round_trip(g, p, plan, range, w, 8);
    const LoadStats& st = plan.stats();
    EXPECT_EQ(st.expert_tokens, (std::vector<int64_t>{128, 0, 0, 0}));
    EXPECT_EQ(st.rank_tokens[0], 128);
    EXPECT_DOUBLE_EQ(st.expert_imbalance, 4.0);
    EXPECT_DOUBLE_EQ(st.rank_imbalance, double(w.size()));
    EXPECT_EQ(plan.n_recv(), w.rank() == 0 ? 128 : 0);
    // Capacity mode on the same load: expert 0 keeps cap = ceil(1 * 2 * 64 / 4) = 32 slots.
    DispatchPlan cplan = DispatchPlan::build(local_view(g, range), p, {1.0}, w);
    EXPECT_EQ(cplan.stats().expert_tokens[0], 32);
    EXPECT_EQ(cplan.stats().slots_dropped, 96);
    // Equal weights: the lowest global (token, slot)s are the ones kept.
    std::vector<int> kept = global_kept(cplan, range, k, g.n_tokens, w);
    for (int s = 0; s < 128; ++s) ASSERT_EQ(kept[s], s < 32 ? 1 : 0) << s;
    check_round_trip(g, p, cplan, range, w, 8);
  }
}

TEST(Exchange, EmptySlotsAndNoTokensAnywhere) {
  Communicator w = Communicator::world();
  const int E = 4;
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  // Every slot empty.
  GlobalRouting g{10, 2, std::vector<int32_t>(20, -1), std::vector<float>(20, 1.0f)};
  auto range = share(g.n_tokens, w);
  for (double cf : {0.0, 1.0}) {
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {cf}, w);
    EXPECT_EQ(plan.n_send(), 0);
    EXPECT_EQ(plan.n_recv(), 0);
    EXPECT_EQ(plan.stats().slots_total, 0);
    EXPECT_EQ(plan.stats().drop_rate(), 0.0);
    EXPECT_EQ(plan.stats().expert_imbalance, 0.0);
    check_round_trip(g, p, plan, range, w, 4);
  }
  // No tokens on any rank.
  GlobalRouting none{0, 2, {}, {}};
  DispatchPlan plan = DispatchPlan::build(RoutingView{0, 2, nullptr, nullptr}, p, {1.0}, w);
  EXPECT_EQ(plan.n_recv(), 0);
  EXPECT_EQ(plan.capacity(), 0);
  check_round_trip(none, p, plan, {0, 0}, w, 4);
}

TEST(Exchange, BadExpertIdFailsOnEveryRank) {
  Communicator w = Communicator::world();
  ExpertPlacement p = ExpertPlacement::blocked(4, w.size());
  // Only the last rank routes to a non-existent expert; every rank must throw.
  std::vector<int32_t> e = {1, w.rank() == w.size() - 1 ? 9 : 2};
  std::vector<float> wt = {0.5f, 0.5f};
  try {
    DispatchPlan::build(RoutingView{1, 2, e.data(), wt.data()}, p, {}, w);
    FAIL() << "no error";
  } catch (const Error& err) {
    EXPECT_EQ(err.kind(), ErrorKind::kInternal);
    EXPECT_NE(std::string(err.what()).find("expert 9"), std::string::npos) << err.what();
  }
}

TEST(Exchange, DefaultPlanIsEmptyAndExchangeIsMovable) {
  DispatchPlan empty;
  EXPECT_EQ(empty.n_recv(), 0);
  EXPECT_EQ(empty.n_send(), 0);
  Communicator w = Communicator::world();
  ExpertPlacement p = ExpertPlacement::blocked(4, w.size());
  GlobalRouting g = random_routing(1, 20, 2, 4);
  auto range = share(g.n_tokens, w);
  const int64_t T = range.second - range.first, d = 4;
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  Exchange a(w, "a");
  Tensor x = token_rows(range, d);
  Tensor y = Tensor::zeros({std::max<int64_t>(plan.n_recv(), 1), d});
  a.dispatch(plan, ConstView(x.data(), T, d), rows_view(y, plan.n_recv(), d));
  Exchange b(std::move(a));  // the moved-to exchange keeps working with its row type
  b.dispatch(plan, ConstView(x.data(), T, d), rows_view(y, plan.n_recv(), d));
  EXPECT_EQ(b.stats().bytes_sent, 2 * (plan.n_send() - plan.send_counts()[w.rank()]) * d * 4);
}

// ---- Node-local shared-memory path: bitwise equal to the MPI path ----

namespace {

bool rows_equal(ConstView a, ConstView b) {
  if (a.rows != b.rows || a.cols != b.cols) return false;
  for (int64_t i = 0; i < a.rows; ++i)
    if (std::memcmp(a.row(i), b.row(i), sizeof(float) * size_t(a.cols)) != 0) return false;
  return true;
}

// Runs dispatch, dispatch_slots and combine through both paths of `ex` on the same inputs and
// checks the shared results equal the MPI ones bitwise. The shared combine reads what this rank
// wrote into combine_buffer; the MPI combine the same rows from a private tensor. Between the
// shared calls the MPI path runs too, so the two interleave.
void check_shared_equals_mpi(Exchange& ex, const DispatchPlan& plan, int64_t d, uint64_t seed,
                             const Communicator& comm) {
  const int k = plan.k();
  const int64_t T = plan.n_tokens(), R = plan.n_recv();
  Tensor x = random_rows(seed + comm.rank(), std::max<int64_t>(T, 1), d);
  Tensor s = random_rows(seed + 100 + comm.rank(), std::max<int64_t>(T * k, 1), d);
  Tensor y = random_rows(seed + 200 + comm.rank(), std::max<int64_t>(R, 1), d);
  auto fresh = [&](int64_t n) {
    Tensor t = Tensor::zeros({std::max<int64_t>(n, 1), d});
    t.fill(-7.0f);
    return t;
  };
  Tensor a = fresh(R), b = fresh(R), c1 = fresh(T * k), c2 = fresh(T * k);

  ConstView va = ex.dispatch_shared(plan, ConstView(x.data(), T, d));
  ex.dispatch(plan, ConstView(x.data(), T, d), rows_view(a, R, d));
  EXPECT_EQ(va.rows, R);
  EXPECT_EQ(va.cols, d);
  EXPECT_TRUE(rows_equal(va, ConstView(a.data(), R, d))) << "dispatch_shared, d " << d;

  ConstView vb = ex.dispatch_slots_shared(plan, ConstView(s.data(), T * k, d));
  ex.dispatch_slots(plan, ConstView(s.data(), T * k, d), rows_view(b, R, d));
  EXPECT_TRUE(rows_equal(vb, ConstView(b.data(), R, d))) << "dispatch_slots_shared, d " << d;

  View buf = ex.combine_buffer(plan, d);
  EXPECT_EQ(buf.rows, R);
  EXPECT_EQ(buf.cols, d);
  for (int64_t i = 0; i < R; ++i) std::memcpy(buf.row(i), y.data() + i * d, sizeof(float) * d);
  ex.combine(plan, ConstView(y.data(), R, d), rows_view(c1, T * k, d));
  ex.combine_shared(plan, rows_view(c2, T * k, d));
  EXPECT_TRUE(rows_equal(ConstView(c2.data(), T * k, d), ConstView(c1.data(), T * k, d)))
      << "combine_shared, d " << d;
}

}  // namespace

TEST(ExchangeShared, AvailableOnOneNode) {
  Communicator w = Communicator::world();
  Exchange ex(w, "shared");
  // The tests run every rank on one machine.
  EXPECT_TRUE(ex.shared_available());
  EXPECT_TRUE(ex.shared_available());  // cached
}

TEST(ExchangeShared, EqualsMpiPathDroplessAndCapacity) {
  Communicator w = Communicator::world();
  Exchange ex(w, "shared");
  if (!ex.shared_available()) GTEST_SKIP() << "ranks span several nodes";
  for (int k : {1, 2})
    for (double cf : {0.0, 0.75, 1.25}) {
      const int E = 8;
      GlobalRouting g = random_routing(31 + k, 211, k, E, /*empty=*/0.1, /*hot=*/0.3);
      ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
      auto range = share(g.n_tokens, w);
      DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {cf}, w);
      if (cf > 0) {
        EXPECT_GT(plan.stats().slots_dropped, 0);
      }
      check_shared_equals_mpi(ex, plan, 19, 1000 + k, w);
    }
  // Interleaved placement: a rank's experts are not a contiguous id range.
  const int E = 6;
  std::vector<int> owner(E);
  for (int e = 0; e < E; ++e) owner[e] = (E - 1 - e) % w.size();
  ExpertPlacement p = ExpertPlacement::from_owners(owner, w.size());
  GlobalRouting g = random_routing(5, 57, 2, E, 0.05);
  auto range = share(g.n_tokens, w);
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  check_shared_equals_mpi(ex, plan, 3, 77, w);
}

TEST(ExchangeShared, SendBlocksPlaceRowsAfterLowerRanks) {
  Communicator w = Communicator::world();
  const int E = 8, k = 2;
  GlobalRouting g = random_routing(9, 120, k, E, 0.1);
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  auto range = share(g.n_tokens, w);
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  // Blocks tile the send rows in order, and match each rank's R.
  int64_t next = 0;
  for (const SendBlock& b : plan.send_blocks()) {
    EXPECT_EQ(b.send, next);
    EXPECT_GT(b.rows, 0);
    EXPECT_LE(b.dest_row + b.rows, plan.rank_recv_rows()[b.dest]);
    next += b.rows;
  }
  EXPECT_EQ(next, plan.n_send());
  EXPECT_EQ(plan.rank_recv_rows()[w.rank()], plan.n_recv());
}

TEST(ExchangeShared, DegenerateLoads) {
  Communicator w = Communicator::world();
  Exchange ex(w, "shared");
  if (!ex.shared_available()) GTEST_SKIP() << "ranks span several nodes";
  const int E = 4, k = 2;
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  // Everything to expert 0, with and without a rank that has no tokens, dropless and capacity.
  GlobalRouting hot{64, k, std::vector<int32_t>(128, 0), std::vector<float>(128, 0.5f)};
  for (int starve : {-1, w.size() - 1})
    for (double cf : {0.0, 1.0}) {
      auto range = share(hot.n_tokens, w, starve);
      DispatchPlan plan = DispatchPlan::build(local_view(hot, range), p, {cf}, w);
      check_shared_equals_mpi(ex, plan, 8, 5, w);
    }
  // Every slot empty.
  GlobalRouting empty{10, k, std::vector<int32_t>(20, -1), std::vector<float>(20, 1.0f)};
  auto range = share(empty.n_tokens, w);
  DispatchPlan plan = DispatchPlan::build(local_view(empty, range), p, {}, w);
  check_shared_equals_mpi(ex, plan, 4, 6, w);
  // No tokens anywhere, on a fresh exchange (no window allocated yet) and on this one.
  DispatchPlan none = DispatchPlan::build(RoutingView{0, k, nullptr, nullptr}, p, {}, w);
  Exchange fresh(w, "fresh");
  check_shared_equals_mpi(fresh, none, 4, 7, w);
  check_shared_equals_mpi(ex, none, 4, 7, w);
}

TEST(ExchangeShared, RepeatedCallsGrowAndShrinkWithoutSteadyStateAllocation) {
  Communicator w = Communicator::world();
  Exchange ex(w, "shared");
  if (!ex.shared_available()) GTEST_SKIP() << "ranks span several nodes";
  const int E = 8, k = 2;
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  const int64_t sizes[][2] = {{10, 4},    {300, 16}, {4000, 160}, {40, 8},
                              {1000, 33}, {0, 8},    {500, 16},   {7, 1}};
  int i = 0;
  for (const auto& sz : sizes) {
    GlobalRouting g = random_routing(50 + i, sz[0], k, E, 0.1, 0.2);
    auto range = share(g.n_tokens, w, i % 3 == 2 ? 0 : -1);
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {i % 2 ? 1.0 : 0.0}, w);
    check_shared_equals_mpi(ex, plan, sz[1], 60 + i, w);
    ++i;
  }
  // Same-size and smaller calls reuse the windows: the views keep their address.
  GlobalRouting g = random_routing(99, 400, k, E);
  auto range = share(g.n_tokens, w);
  DispatchPlan big = DispatchPlan::build(local_view(g, range), p, {}, w);
  DispatchPlan small = DispatchPlan::build(local_view(g, range), p, {0.5}, w);
  Tensor x = random_rows(3, std::max<int64_t>(range.second - range.first, 1), 16);
  Tensor out = Tensor::zeros({std::max<int64_t>(big.n_tokens() * k, 1), 16});
  const int64_t T = big.n_tokens();
  const float *in0 = nullptr, *out0 = nullptr;
  for (int rep = 0; rep < 4; ++rep) {
    const DispatchPlan& plan = rep % 2 ? small : big;
    ConstView v = ex.dispatch_shared(plan, ConstView(x.data(), T, 16));
    View buf = ex.combine_buffer(plan, 16);
    for (int64_t r = 0; r < v.rows; ++r) std::memcpy(buf.row(r), v.row(r), sizeof(float) * 16);
    ex.combine_shared(plan, rows_view(out, T * k, 16));
    for (int64_t s = 0; s < T * k; ++s) {
      const float want = plan.kept()[s] ? x[(s / k) * 16 + 5] : 0.0f;
      ASSERT_EQ(out[s * 16 + 5], want) << "rep " << rep << " slot " << s;
    }
    if (rep == 0) in0 = v.data, out0 = buf.data;
    if (big.n_recv() > 0 && small.n_recv() > 0) {
      EXPECT_EQ(v.data, in0) << "rep " << rep;
      EXPECT_EQ(buf.data, out0) << "rep " << rep;
    }
  }
  // Interleaved with the non-blocking MPI path on the same exchange.
  Tensor a = Tensor::zeros({std::max<int64_t>(big.n_recv(), 1), 16});
  ex.dispatch_start(big, ConstView(x.data(), T, 16));
  ConstView v = ex.dispatch_shared(big, ConstView(x.data(), T, 16));
  ex.dispatch_wait(big, rows_view(a, big.n_recv(), 16));
  EXPECT_TRUE(rows_equal(v, ConstView(a.data(), big.n_recv(), 16)));
}

TEST(ExchangeShared, ConsecutiveCombinesWithoutDispatch) {
  Communicator w = Communicator::world();
  Exchange ex(w, "shared");
  if (!ex.shared_available()) GTEST_SKIP() << "ranks span several nodes";
  const int E = 8, k = 2;
  const int64_t d = 256;
  ExpertPlacement p = ExpertPlacement::blocked(E, w.size());
  GlobalRouting g = random_routing(17, 3000, k, E, 0.05);
  auto range = share(g.n_tokens, w);
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  const int64_t T = plan.n_tokens(), R = plan.n_recv();
  // Expected results first (through the MPI path), so that the shared rounds below run back to
  // back with no other collective between them: each round overwrites the output window at
  // once, and a rank still reading the previous round would see the new values.
  const int rounds = 6;
  std::vector<Tensor> y, want, got;
  for (int rep = 0; rep < rounds; ++rep) {
    y.push_back(random_rows(500 + rep * 10 + w.rank(), std::max<int64_t>(R, 1), d));
    want.push_back(Tensor::zeros({std::max<int64_t>(T * k, 1), d}));
    got.push_back(Tensor::zeros({std::max<int64_t>(T * k, 1), d}));
    ex.combine(plan, ConstView(y[rep].data(), R, d), rows_view(want[rep], T * k, d));
  }
  for (int rep = 0; rep < rounds; ++rep) {
    View buf = ex.combine_buffer(plan, d);
    std::memcpy(buf.data, y[rep].data(), sizeof(float) * size_t(R * d));
    ex.combine_shared(plan, rows_view(got[rep], T * k, d));
  }
  for (int rep = 0; rep < rounds; ++rep)
    EXPECT_TRUE(
        rows_equal(ConstView(got[rep].data(), T * k, d), ConstView(want[rep].data(), T * k, d)))
        << "round " << rep;
}

TEST(ExchangeShared, CombineWithoutBufferFailsOnEveryRank) {
  Communicator w = Communicator::world();
  Exchange ex(w, "shared");
  if (!ex.shared_available()) GTEST_SKIP() << "ranks span several nodes";
  ExpertPlacement p = ExpertPlacement::blocked(4, w.size());
  GlobalRouting g = random_routing(1, 20, 2, 4);
  auto range = share(g.n_tokens, w);
  DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
  Tensor out = Tensor::zeros({std::max<int64_t>(plan.n_tokens() * 2, 1), 4});
  EXPECT_THROW(ex.combine_shared(plan, rows_view(out, plan.n_tokens() * 2, 4)), Error);
}

// ---- Hierarchical (node-aware) path: bitwise equal to the flat path ----

namespace {

// Runs dispatch, dispatch_slots and combine through a flat and a hierarchical exchange on the
// same inputs; the results must be bitwise equal (the rows are only copied).
void check_hierarchical_equals_flat(Exchange& flat, Exchange& hier, const DispatchPlan& plan,
                                    int64_t d, uint64_t seed, const Communicator& comm) {
  const int k = plan.k();
  const int64_t T = plan.n_tokens(), R = plan.n_recv();
  Tensor x = random_rows(seed + comm.rank(), std::max<int64_t>(T, 1), d);
  Tensor s = random_rows(seed + 100 + comm.rank(), std::max<int64_t>(T * k, 1), d);
  Tensor y = random_rows(seed + 200 + comm.rank(), std::max<int64_t>(R, 1), d);
  auto fresh = [&](int64_t n, float v) {
    Tensor t = Tensor::zeros({std::max<int64_t>(n, 1), d});
    t.fill(v);
    return t;
  };
  Tensor a1 = fresh(R, -7), a2 = fresh(R, 9), b1 = fresh(R, -7), b2 = fresh(R, 9);
  Tensor c1 = fresh(T * k, -7), c2 = fresh(T * k, 9);
  flat.dispatch(plan, ConstView(x.data(), T, d), rows_view(a1, R, d));
  hier.dispatch(plan, ConstView(x.data(), T, d), rows_view(a2, R, d));
  EXPECT_TRUE(rows_equal(ConstView(a2.data(), R, d), ConstView(a1.data(), R, d)))
      << "dispatch, d " << d;
  flat.dispatch_slots(plan, ConstView(s.data(), T * k, d), rows_view(b1, R, d));
  hier.dispatch_slots(plan, ConstView(s.data(), T * k, d), rows_view(b2, R, d));
  EXPECT_TRUE(rows_equal(ConstView(b2.data(), R, d), ConstView(b1.data(), R, d)))
      << "dispatch_slots, d " << d;
  flat.combine(plan, ConstView(y.data(), R, d), rows_view(c1, T * k, d));
  hier.combine(plan, ConstView(y.data(), R, d), rows_view(c2, T * k, d));
  EXPECT_TRUE(rows_equal(ConstView(c2.data(), T * k, d), ConstView(c1.data(), T * k, d)))
      << "combine, d " << d;
}

// Every ranks_per_node that divides the world size: 1 node x P, ..., P nodes x 1.
std::vector<int> divisors(int P) {
  std::vector<int> out;
  for (int n = 1; n <= P; ++n)
    if (P % n == 0) out.push_back(n);
  return out;
}

}  // namespace

TEST(ExchangeHierarchical, ForcedLayouts) {
  Communicator w = Communicator::world();
  const int P = w.size();
  for (int rpn : divisors(P)) {
    Exchange ex(w, "hier", {ExchangeAlgorithm::kHierarchical, rpn});
    const NodeLayout& lay = ex.nodes();
    EXPECT_TRUE(lay.forced);
    EXPECT_EQ(lay.n_nodes, P / rpn);
    EXPECT_EQ(lay.ranks_per_node, rpn);
    EXPECT_EQ(lay.node[w.rank()], w.rank() / rpn);
    EXPECT_EQ(lay.local[w.rank()], w.rank() % rpn);
    // Several forced nodes on one machine: the shared-window path is off.
    EXPECT_EQ(ex.shared_available(), rpn == P) << lay.describe();
  }
  // Detected: the tests run every rank on one machine.
  Exchange det(w, "det");
  EXPECT_FALSE(det.nodes().forced);
  EXPECT_EQ(det.nodes().n_nodes, 1);
  EXPECT_EQ(det.nodes().ranks_per_node, P);
}

TEST(ExchangeHierarchical, EqualsFlatBitwise) {
  Communicator w = Communicator::world();
  const int P = w.size();
  for (int rpn : divisors(P)) {
    SCOPED_TRACE("ranks_per_node " + std::to_string(rpn));
    Exchange flat(w, "flat"), hier(w, "hier", {ExchangeAlgorithm::kHierarchical, rpn});
    // Dropless and capacity, top-1 and top-2, with empty slots and a hot expert.
    for (int k : {1, 2})
      for (double cf : {0.0, 0.75}) {
        const int E = 8;
        GlobalRouting g = random_routing(41 + k, 233, k, E, /*empty=*/0.1, /*hot=*/0.3);
        ExpertPlacement p = ExpertPlacement::blocked(E, P);
        auto range = share(g.n_tokens, w);
        DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {cf}, w);
        check_hierarchical_equals_flat(flat, hier, plan, 19, 2000 + k, w);
      }
    // Interleaved placement: a rank's experts are not a contiguous id range.
    {
      const int E = 6;
      std::vector<int> owner(E);
      for (int e = 0; e < E; ++e) owner[e] = (E - 1 - e) % P;
      ExpertPlacement p = ExpertPlacement::from_owners(owner, P);
      GlobalRouting g = random_routing(5, 57, 2, E, 0.05);
      auto range = share(g.n_tokens, w);
      DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
      check_hierarchical_equals_flat(flat, hier, plan, 3, 77, w);
    }
    // Degenerate loads: everything to expert 0, with and without a rank that has no tokens;
    // every slot empty; no tokens anywhere.
    const int E = 4, k = 2;
    ExpertPlacement p = ExpertPlacement::blocked(E, P);
    GlobalRouting hot{64, k, std::vector<int32_t>(128, 0), std::vector<float>(128, 0.5f)};
    for (int starve : {-1, P - 1})
      for (double cf : {0.0, 1.0}) {
        auto range = share(hot.n_tokens, w, starve);
        DispatchPlan plan = DispatchPlan::build(local_view(hot, range), p, {cf}, w);
        check_hierarchical_equals_flat(flat, hier, plan, 8, 5, w);
      }
    GlobalRouting empty{10, k, std::vector<int32_t>(20, -1), std::vector<float>(20, 1.0f)};
    auto range = share(empty.n_tokens, w);
    DispatchPlan plan = DispatchPlan::build(local_view(empty, range), p, {}, w);
    check_hierarchical_equals_flat(flat, hier, plan, 4, 6, w);
    DispatchPlan none = DispatchPlan::build(RoutingView{0, k, nullptr, nullptr}, p, {}, w);
    check_hierarchical_equals_flat(flat, hier, none, 4, 7, w);
    // Buffers grow and shrink over calls of different sizes.
    for (int64_t d : {1, 64, 5}) {
      GlobalRouting g = random_routing(60 + d, 400, 2, 8, 0.05);
      ExpertPlacement p8 = ExpertPlacement::blocked(8, P);
      auto r = share(g.n_tokens, w);
      DispatchPlan pl = DispatchPlan::build(local_view(g, r), p8, {}, w);
      check_hierarchical_equals_flat(flat, hier, pl, d, 8, w);
    }
  }
}

TEST(ExchangeHierarchical, TrafficAcrossNodes) {
  // Per dispatch, a rank's messages to other nodes: flat up to (N-1)*L, hierarchical up to N-1;
  // the bytes crossing node boundaries, summed over ranks, are the same for both.
  Communicator w = Communicator::world();
  const int P = w.size();
  for (int rpn : divisors(P)) {
    SCOPED_TRACE("ranks_per_node " + std::to_string(rpn));
    const int N = P / rpn, L = rpn;
    Exchange flat(w, "flat", {ExchangeAlgorithm::kFlat, rpn});
    Exchange hier(w, "hier", {ExchangeAlgorithm::kHierarchical, rpn});
    flat.nodes();  // the flat exchange counts internode traffic once it knows the layout
    GlobalRouting g = random_routing(77, 300, 2, 8);
    ExpertPlacement p = ExpertPlacement::blocked(8, P);
    auto range = share(g.n_tokens, w);
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {}, w);
    const int64_t T = plan.n_tokens(), R = plan.n_recv(), d = 8;
    Tensor x = token_rows(range, d), a = Tensor::zeros({std::max<int64_t>(R, 1), d});
    flat.dispatch(plan, ConstView(x.data(), T, d), rows_view(a, R, d));
    hier.dispatch(plan, ConstView(x.data(), T, d), rows_view(a, R, d));
    const ExchangeStats &f = flat.stats(), &h = hier.stats();
    EXPECT_LE(f.internode_messages_sent, int64_t(N - 1) * L);
    EXPECT_LE(h.internode_messages_sent, int64_t(N - 1));
    // On one node the blocking flat path sends one message per (rank, local expert) block.
    EXPECT_LE(f.messages_sent, int64_t(P - 1) * (N == 1 ? 8 / P : 1));
    EXPECT_LE(h.messages_sent, int64_t(N - 1) + (L - 1));
    EXPECT_EQ(w.sum(f.internode_bytes_sent), w.sum(h.internode_bytes_sent));
    if (N == 1) {
      EXPECT_EQ(f.internode_bytes_sent, 0);
      EXPECT_EQ(h.internode_bytes_sent, 0);
    }
    if (L == 1) {
      EXPECT_EQ(h.internode_messages_sent, f.internode_messages_sent);
      EXPECT_EQ(h.bytes_sent, f.bytes_sent);
    }
  }
}

TEST(ExchangeHierarchical, InvalidRanksPerNodeFailsOnEveryRank) {
  Communicator w = Communicator::world();
  for (int rpn : {w.size() + 1, -2}) {
    Exchange ex(w, "hier", {ExchangeAlgorithm::kHierarchical, rpn});
    try {
      ex.nodes();
      ADD_FAILURE() << "ranks_per_node " << rpn << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kConfig);
      EXPECT_NE(std::string(e.what()).find("comm.ranks_per_node = " + std::to_string(rpn)),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_NE(check_ranks_per_node(3, 4).find("does not divide the 4 ranks"), std::string::npos);
  EXPECT_EQ(check_ranks_per_node(2, 4), "");
  EXPECT_EQ(check_ranks_per_node(0, 3), "");
}

// ---- Large movements: the row copies switch to streaming stores (over 4 MB per call) ----

TEST(ExchangeLarge, StreamingCopiesKeepEveryPathExact) {
  // About 4.7 MB of slot rows per rank and direction; d = 131 makes most rows start off a
  // vector boundary, so the unaligned heads and tails of the streaming copies are exercised.
  Communicator w = Communicator::world();
  const int P = w.size(), E = 8, k = 2;
  const int64_t d = 131;
  for (double cf : {0.0, 1.0}) {
    SCOPED_TRACE("capacity_factor " + std::to_string(cf));
    GlobalRouting g = random_routing(91, 4500 * int64_t(P), k, E, /*empty=*/0.02, /*hot=*/0.1);
    ExpertPlacement p = ExpertPlacement::blocked(E, P);
    auto range = share(g.n_tokens, w);
    DispatchPlan plan = DispatchPlan::build(local_view(g, range), p, {cf}, w);
    check_round_trip(g, p, plan, range, w, d);
    Exchange ex(w, "large");
    if (ex.shared_available()) check_shared_equals_mpi(ex, plan, d, 300, w);
    for (int rpn : divisors(P)) {
      Exchange flat(w, "flat"), hier(w, "hier", {ExchangeAlgorithm::kHierarchical, rpn});
      check_hierarchical_equals_flat(flat, hier, plan, d, 400 + rpn, w);
    }
    // Non-blocking forms (rows to this rank go through the receive buffer) == blocking.
    const int64_t T = plan.n_tokens(), R = plan.n_recv();
    Tensor x = random_rows(500 + w.rank(), std::max<int64_t>(T, 1), d);
    Tensor y = random_rows(600 + w.rank(), std::max<int64_t>(R, 1), d);
    Tensor a1 = Tensor::zeros({std::max<int64_t>(R, 1), d});
    Tensor a2 = Tensor::zeros({std::max<int64_t>(R, 1), d});
    Tensor c1 = Tensor::zeros({std::max<int64_t>(T * k, 1), d});
    Tensor c2 = Tensor::zeros({std::max<int64_t>(T * k, 1), d});
    Exchange one(w, "blocking"), two(w, "nonblocking");
    one.dispatch(plan, ConstView(x.data(), T, d), rows_view(a1, R, d));
    one.combine(plan, ConstView(y.data(), R, d), rows_view(c1, T * k, d));
    two.dispatch_start(plan, ConstView(x.data(), T, d));
    two.combine_start(plan, ConstView(y.data(), R, d));
    two.dispatch_wait(plan, rows_view(a2, R, d));
    two.combine_wait(plan, rows_view(c2, T * k, d));
    EXPECT_TRUE(rows_equal(ConstView(a2.data(), R, d), ConstView(a1.data(), R, d)));
    EXPECT_TRUE(rows_equal(ConstView(c2.data(), T * k, d), ConstView(c1.data(), T * k, d)));
  }
}
