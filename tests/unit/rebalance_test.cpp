// The rebalance planner on hand-built loads with known optimal placements, placements with
// replicas, and the load tracker's moving average.
#include "comm/rebalance.hpp"

#include <gtest/gtest.h>

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
