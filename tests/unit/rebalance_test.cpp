// The rebalance planner on hand-built loads with known optimal placements, placements with
// replicas, and the load tracker's moving average.
#include "comm/rebalance.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "runtime/error.hpp"

using moe::Error;
using moe::comm::ExpertPlacement;
using moe::comm::LoadTracker;
using moe::comm::PlacementPlan;
using moe::comm::plan_placement;
using moe::comm::RebalanceOptions;
using moe::comm::RebalancePolicy;

TEST(PlacementReplicas, InstancesSlotsAndDescription) {
  ExpertPlacement p = ExpertPlacement::from_instances({{0, 1}, {0}, {1}, {1}}, 2);
  EXPECT_EQ(p.owner(0), 0);
  EXPECT_EQ(p.n_instances(0), 2);
  EXPECT_EQ(p.slot_on(0, 1), 0);
  EXPECT_EQ(p.slot_on(1, 1), -1);
  EXPECT_EQ(p.local_experts(1), (std::vector<int>{0, 2, 3}));
  EXPECT_EQ(p.n_replicas(), 1);
  EXPECT_EQ(p.describe(), "4 experts over 2 ranks: r0=[0,1] r1=[0',2,3]");
  EXPECT_THROW(ExpertPlacement::from_instances({{0, 0}, {1}}, 2), Error);
  EXPECT_THROW(ExpertPlacement::from_instances({{0}, {}}, 2), Error);
  EXPECT_FALSE(ExpertPlacement::blocked(4, 2).has_replicas());
}

TEST(Rebalance, LptFindsTheOptimumOfFourExperts) {
  // Blocked: r0 = {0, 1} carries 7, r1 = {2, 3} carries 3; the optimum is 5 and 5.
  const ExpertPlacement cur = ExpertPlacement::blocked(4, 2);
  const PlacementPlan plan = plan_placement({4, 3, 2, 1}, cur, RebalanceOptions{});
  ASSERT_TRUE(plan.changed);
  EXPECT_DOUBLE_EQ(plan.max_before, 7.0);
  EXPECT_DOUBLE_EQ(plan.max_after, 5.0);
  EXPECT_DOUBLE_EQ(plan.imbalance_after, 1.0);
  EXPECT_EQ(plan.placement.local_experts(0), (std::vector<int>{0, 3}));  // expert 0 stays
  EXPECT_EQ(plan.placement.local_experts(1), (std::vector<int>{1, 2}));
  EXPECT_NEAR(plan.predicted_gain(), 1.4, 1e-12);
}

TEST(Rebalance, BalancedPlacementIsKept) {
  const ExpertPlacement cur = ExpertPlacement::blocked(8, 4);
  const PlacementPlan plan = plan_placement(std::vector<double>(8, 5.0), cur, RebalanceOptions{});
  EXPECT_FALSE(plan.changed);
  EXPECT_TRUE(plan.placement == cur);
}

TEST(Rebalance, SmallGainIsNotWorthAMigration) {
  // r0 carries 10.2, r1 9.8 (imbalance 1.02): below the 5% minimum gain.
  const ExpertPlacement cur = ExpertPlacement::blocked(4, 2);
  EXPECT_FALSE(plan_placement({5.2, 5, 4.9, 4.9}, cur, RebalanceOptions{}).changed);
}

TEST(Rebalance, HotExpertGetsReplicasOnTheOtherRanks) {
  // E = 8 on P = 4; expert 0 takes 8 of 15 slots. Ideal rank load 3.75. Two replicas give three
  // instances of 8/3; the seven cold experts fill in: the best possible maximum is 4 (three
  // ranks at 8/3 + 1, one rank with four cold experts).
  const ExpertPlacement cur = ExpertPlacement::blocked(8, 4);
  RebalanceOptions o;
  o.replicas = 2;
  const PlacementPlan plan = plan_placement({8, 1, 1, 1, 1, 1, 1, 1}, cur, o);
  ASSERT_TRUE(plan.changed);
  EXPECT_EQ(plan.placement.n_instances(0), 3);
  EXPECT_EQ(plan.placement.owner(0), 0);  // the primary stays home
  EXPECT_DOUBLE_EQ(plan.max_before, 9.0);
  EXPECT_DOUBLE_EQ(plan.max_after, 4.0);
  EXPECT_NEAR(plan.imbalance_after, 4.0 / 3.75, 1e-12);
}

TEST(Rebalance, NoReplicaWhenTheHotExpertFitsOneRank) {
  // Expert 0 carries exactly half of the load on 2 ranks: alone on a rank is optimal.
  RebalanceOptions o;
  o.replicas = 2;
  const PlacementPlan plan =
      plan_placement({7, 1, 1, 1, 1, 1, 1, 1}, ExpertPlacement::blocked(8, 2), o);
  ASSERT_TRUE(plan.changed);
  EXPECT_FALSE(plan.placement.has_replicas());
  EXPECT_EQ(plan.placement.local_experts(0), (std::vector<int>{0}));
  EXPECT_DOUBLE_EQ(plan.imbalance_after, 1.0);
}

TEST(Rebalance, MinimumExpertsPerRank) {
  RebalanceOptions o;
  o.min_experts_per_rank = 2;
  const PlacementPlan plan = plan_placement({10, 1, 0, 0}, ExpertPlacement::blocked(4, 2), o);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(plan.placement.n_local(r), 2) << r;
  o.min_experts_per_rank = 3;
  EXPECT_THROW(plan_placement({10, 1, 0, 0}, ExpertPlacement::blocked(4, 2), o), Error);
}

TEST(Rebalance, ReplicatePolicyKeepsPrimaries) {
  // r0 = {0, 1} carries 7, r1 = {2, 3} 1; one replica of expert 0 goes to r1: 4 and 4.
  RebalanceOptions o;
  o.replicas = 1;
  o.policy = RebalancePolicy::kReplicate;
  const PlacementPlan plan = plan_placement({6, 1, 1, 0}, ExpertPlacement::blocked(4, 2), o);
  ASSERT_TRUE(plan.changed);
  EXPECT_EQ(plan.placement.describe(), "4 experts over 2 ranks: r0=[0,1] r1=[0',2,3]");
  EXPECT_DOUBLE_EQ(plan.max_after, 4.0);
}

TEST(Rebalance, DeterministicAndIdempotent) {
  RebalanceOptions o;
  o.replicas = 3;
  const std::vector<double> load = {3, 17, 2, 2, 9, 1, 0, 5, 5, 4, 1, 1};
  const ExpertPlacement cur = ExpertPlacement::blocked(12, 4);
  const PlacementPlan a = plan_placement(load, cur, o), b = plan_placement(load, cur, o);
  EXPECT_TRUE(a.placement == b.placement);
  EXPECT_LT(a.max_after, a.max_before);
  // Planning again from the new map under the same load changes nothing.
  EXPECT_FALSE(plan_placement(load, a.placement, o).changed);
}

TEST(Rebalance, FewMovesFromTheCurrentMap) {
  // Blocked on 4 ranks: r0 = {0, 1} carries 6, the others 2 each; the optimum is 3 per rank and
  // three moves reach it (1 to r1, 2 to r2, 3 to r3), where a fresh placement moves more.
  const ExpertPlacement cur = ExpertPlacement::blocked(8, 4);
  const PlacementPlan plan = plan_placement({3, 3, 1, 1, 1, 1, 1, 1}, cur, RebalanceOptions{});
  ASSERT_TRUE(plan.changed);
  EXPECT_DOUBLE_EQ(plan.max_after, 3.0);
  int moved = 0;
  for (int e = 0; e < 8; ++e) moved += plan.placement.owner(e) != cur.owner(e);
  EXPECT_EQ(moved, 3) << plan.placement.describe();
}

namespace {

// The most instances on one rank.
int most(const ExpertPlacement& p) {
  int n = 0;
  for (int r = 0; r < p.n_ranks(); ++r) n = std::max(n, p.n_local(r));
  return n;
}

// Smallest maximum rank load over every placement of load.size() experts on P ranks with at most
// `cap` experts per rank (P^E assignments).
double brute_force_optimum(const std::vector<double>& load, int P, int cap) {
  const int E = static_cast<int>(load.size());
  int64_t n = 1;
  for (int e = 0; e < E; ++e) n *= P;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t code = 0; code < n; ++code) {
    std::vector<double> rl(static_cast<size_t>(P), 0.0);
    std::vector<int> count(static_cast<size_t>(P), 0);
    int64_t c = code;
    bool ok = true;
    for (int e = 0; e < E && ok; ++e, c /= P) {
      rl[c % P] += load[e];
      ok = ++count[c % P] <= cap;
    }
    if (ok) best = std::min(best, *std::max_element(rl.begin(), rl.end()));
  }
  return best;
}

}  // namespace

TEST(RebalanceCap, TightCapMatchesTheBruteForceOptimum) {
  // 6 experts on 3 ranks with at most 2 each: LPT under the cap pairs the largest with the
  // smallest, which is optimal for two per rank; the planner's maximum equals the optimum over
  // all 3^6 placements. With a cap of 3 (7 experts), it stays within 4/3 of the optimum.
  const std::vector<std::vector<double>> loads = {{9, 8, 7, 3, 2, 1},  {20, 1, 1, 1, 1, 1},
                                                  {5, 5, 5, 5, 5, 5},  {13, 11, 7, 6, 4, 2},
                                                  {1, 2, 3, 4, 50, 6}, {8, 8, 1, 1, 1, 0}};
  for (const auto& load : loads) {
    RebalanceOptions o;
    o.min_gain = 0;
    o.max_experts_per_rank = 2;
    const PlacementPlan plan = plan_placement(load, ExpertPlacement::blocked(6, 3), o);
    EXPECT_EQ(plan.cap, 2);
    EXPECT_LE(most(plan.placement), 2) << plan.placement.describe();
    EXPECT_LE(plan.instances_after, 2);
    EXPECT_DOUBLE_EQ(plan.max_after, brute_force_optimum(load, 3, 2)) << load[0];
  }
  const std::vector<std::vector<double>> seven = {{9, 8, 7, 3, 2, 1, 1},
                                                  {30, 1, 1, 1, 1, 1, 1},
                                                  {6, 6, 5, 5, 4, 4, 3},
                                                  {13, 2, 7, 11, 4, 6, 9}};
  for (const auto& load : seven) {
    RebalanceOptions o;
    o.min_gain = 0;
    o.max_experts_per_rank = 3;
    const PlacementPlan plan = plan_placement(load, ExpertPlacement::blocked(7, 3), o);
    EXPECT_LE(most(plan.placement), 3) << plan.placement.describe();
    const double opt = brute_force_optimum(load, 3, 3);
    EXPECT_GE(plan.max_after, opt);
    EXPECT_LE(plan.max_after, opt * 4.0 / 3.0) << plan.placement.describe();
  }
}

TEST(RebalanceCap, SkewedTwoRanksKeepOnePlusSevenUnderTheDefault) {
  // 8 experts on 2 ranks, one hot: the default cap 2 x 4 = 8 allows 1 + 7 (unchanged); a cap of
  // 5 gives 3 + 5, the best under it: the hot expert with two cold ones (9), five cold (5).
  const std::vector<double> load = {7, 1, 1, 1, 1, 1, 1, 1};
  const PlacementPlan free = plan_placement(load, ExpertPlacement::blocked(8, 2), {});
  EXPECT_EQ(free.cap, 8);
  EXPECT_EQ(free.placement.local_experts(0), (std::vector<int>{0}));
  EXPECT_EQ(free.instances_after, 7);
  RebalanceOptions o;
  o.max_experts_per_rank = 5;
  const PlacementPlan capped = plan_placement(load, ExpertPlacement::blocked(8, 2), o);
  ASSERT_TRUE(capped.changed);
  EXPECT_EQ(capped.instances_after, 5);
  EXPECT_EQ(capped.placement.n_local(0), 3) << capped.placement.describe();
  EXPECT_DOUBLE_EQ(capped.max_after, 9.0);
  EXPECT_DOUBLE_EQ(capped.max_after, brute_force_optimum(load, 2, 5));
}

TEST(RebalanceCap, DefaultCapLimitsInstancesOfSixtyFourExperts) {
  // 64 experts on 8 ranks: seven hot experts (100 slots each, all on r0 when blocked) and 57
  // cold ones (1 each). Without a cap, LPT gives each hot expert a rank and piles all 57 cold
  // experts on the eighth (57 experts' weights and AdamW state where blocked placement has 8).
  // The default cap 2 x 8 = 16 stops that rank at 16; the other 41 join the hot ranks, 6 at
  // most: 106, the best possible under the cap. (min_gain 0: the plan is LPT's or better.)
  std::vector<double> load(64, 1.0);
  for (int e = 0; e < 7; ++e) load[static_cast<size_t>(e)] = 100;
  const ExpertPlacement cur = ExpertPlacement::blocked(64, 8);
  RebalanceOptions o;
  o.min_gain = 0;
  o.max_experts_per_rank = 64;
  const PlacementPlan free = plan_placement(load, cur, o);
  ASSERT_TRUE(free.changed);
  EXPECT_EQ(free.instances_after, 57) << free.placement.describe();
  EXPECT_DOUBLE_EQ(free.max_after, 100.0);
  o.max_experts_per_rank = 0;
  const PlacementPlan capped = plan_placement(load, cur, o);
  ASSERT_TRUE(capped.changed);
  EXPECT_EQ(capped.cap, 16);
  EXPECT_EQ(capped.instances_after, 16) << capped.placement.describe();
  EXPECT_DOUBLE_EQ(capped.max_after, 106.0);
  // With replicas the instances still fit under the cap.
  o = RebalanceOptions{};
  o.replicas = 8;
  const PlacementPlan repl = plan_placement(load, cur, o);
  EXPECT_LE(most(repl.placement), 16) << repl.placement.describe();
}

TEST(RebalanceCap, ReplicaOnlyWhereThereIsRoom) {
  // Policy replicate, r0 = {0}, r1 = {1, 2, 3}: the replica of hot expert 0 can only go to r1,
  // which a cap of 3 fills already, so nothing changes; a cap of 4 takes it.
  const ExpertPlacement cur = ExpertPlacement::from_instances({{0}, {1}, {1}, {1}}, 2);
  RebalanceOptions o;
  o.replicas = 1;
  o.policy = RebalancePolicy::kReplicate;
  o.max_experts_per_rank = 3;
  const PlacementPlan full = plan_placement({10, 1, 1, 1}, cur, o);
  EXPECT_FALSE(full.changed);
  EXPECT_FALSE(full.placement.has_replicas());
  o.max_experts_per_rank = 4;
  const PlacementPlan room = plan_placement({10, 1, 1, 1}, cur, o);
  ASSERT_TRUE(room.changed);
  EXPECT_EQ(room.placement.n_instances(0), 2);
  EXPECT_DOUBLE_EQ(room.max_after, 8.0);
  // Under lpt, with no room left at all (E = P x cap), no replica is bought.
  o = RebalanceOptions{};
  o.replicas = 2;
  o.max_experts_per_rank = 2;
  EXPECT_FALSE(
      plan_placement({10, 1, 1, 1}, ExpertPlacement::blocked(4, 2), o).placement.has_replicas());
}

TEST(RebalanceCap, MapOverTheCapIsReplacedWithoutGain) {
  // Six experts on r0 (e.g. a checkpoint of a run with another cap), balanced by load: the
  // cap of 4 forces a new map although its maximum load is higher.
  const ExpertPlacement cur =
      ExpertPlacement::from_instances({{0}, {0}, {0}, {0}, {0}, {0}, {1}, {1}}, 2);
  RebalanceOptions o;
  o.max_experts_per_rank = 4;
  const PlacementPlan plan = plan_placement({1, 1, 1, 1, 1, 1, 3, 3}, cur, o);
  ASSERT_TRUE(plan.changed);
  EXPECT_EQ(plan.instances_before, 6);
  EXPECT_EQ(plan.instances_after, 4);
  EXPECT_EQ(most(plan.placement), 4);
}

TEST(RebalanceCap, CapBelowTheBlockedShareIsAConfigError) {
  RebalanceOptions o;
  o.max_experts_per_rank = 3;
  EXPECT_EQ(moe::comm::expert_cap(o, 8, 2), 3);
  EXPECT_EQ(moe::comm::expert_cap(RebalanceOptions{}, 8, 3), 6);  // 2 x ceil(8 / 3)
  try {
    moe::comm::check_expert_cap(o, 8, 2);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), moe::ErrorKind::kConfig);
    const std::string m = e.message();
    EXPECT_NE(m.find("comm.rebalance.max_experts_per_rank = 3"), std::string::npos) << m;
    EXPECT_NE(m.find("ceil(8 / 2) = 4"), std::string::npos) << m;
  }
  EXPECT_THROW(plan_placement(std::vector<double>(8, 1.0), ExpertPlacement::blocked(8, 2), o),
               Error);
  o.max_experts_per_rank = 4;
  EXPECT_NO_THROW(moe::comm::check_expert_cap(o, 8, 2));
}

TEST(Rebalance, ParsePolicy) {
  EXPECT_EQ(moe::comm::parse_rebalance_policy("lpt"), RebalancePolicy::kLpt);
  EXPECT_THROW(moe::comm::parse_rebalance_policy("greedy"), Error);
}

TEST(LoadTracker, ExponentialMovingAverage) {
  LoadTracker t(1, 2, 0.5);
  t.add(0, {4, 0});
  t.add(0, {4, 2});  // two micro-steps: the step's load is their sum
  t.end_step();
  EXPECT_EQ(t.load(0), (std::vector<double>{8, 2}));  // the first step sets it
  t.add(0, {0, 6});
  t.end_step();
  EXPECT_EQ(t.load(0), (std::vector<double>{4, 4}));
  EXPECT_EQ(t.steps(), 2);
}
