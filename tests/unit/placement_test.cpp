// ExpertPlacement: blocked and explicit maps, and the configuration errors they report.
#include "comm/placement.hpp"

#include <gtest/gtest.h>

#include <string>

#include "runtime/error.hpp"

using moe::Error;
using moe::ErrorKind;
using moe::comm::ExpertPlacement;

TEST(Placement, BlockedEvenSplit) {
  ExpertPlacement p = ExpertPlacement::blocked(8, 4);
  EXPECT_EQ(p.n_experts(), 8);
  EXPECT_EQ(p.n_ranks(), 4);
  for (int e = 0; e < 8; ++e) {
    EXPECT_EQ(p.owner(e), e / 2);
    EXPECT_EQ(p.slot(e), e % 2);
  }
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(p.n_local(r), 2);
    EXPECT_EQ(p.local_experts(r), (std::vector<int>{2 * r, 2 * r + 1}));
  }
}

TEST(Placement, BlockedUnevenGivesTheFirstRanksOneMore) {
  // E = 7, P = 3: ranks own 3, 2, 2 experts.
  ExpertPlacement p = ExpertPlacement::blocked(7, 3);
  EXPECT_EQ(p.local_experts(0), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(p.local_experts(1), (std::vector<int>{3, 4}));
  EXPECT_EQ(p.local_experts(2), (std::vector<int>{5, 6}));
  EXPECT_EQ(p.owner(4), 1);
  EXPECT_EQ(p.slot(4), 1);
  EXPECT_EQ(p.owner(5), 2);
  EXPECT_EQ(p.slot(5), 0);
}

TEST(Placement, OneRankOwnsEverything) {
  ExpertPlacement p = ExpertPlacement::blocked(5, 1);
  EXPECT_EQ(p.n_local(0), 5);
  for (int e = 0; e < 5; ++e) EXPECT_EQ(p.slot(e), e);
}

TEST(Placement, FewerExpertsThanRanksIsAConfigErrorNamingBoth) {
  try {
    ExpertPlacement::blocked(3, 4);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kConfig);
    const std::string msg = e.what();
    EXPECT_NE(msg.find("3 experts"), std::string::npos) << msg;
    EXPECT_NE(msg.find("4 ranks"), std::string::npos) << msg;
  }
  EXPECT_THROW(ExpertPlacement::blocked(0, 1), Error);
  EXPECT_THROW(ExpertPlacement::blocked(4, 0), Error);
}

TEST(Placement, ExplicitOwnersAssignSlotsByIncreasingGlobalId) {
  // Interleaved, uneven: rank 1 holds experts 0, 2, 3; rank 0 holds 1 and 4.
  ExpertPlacement p = ExpertPlacement::from_owners({1, 0, 1, 1, 0}, 2);
  EXPECT_EQ(p.local_experts(0), (std::vector<int>{1, 4}));
  EXPECT_EQ(p.local_experts(1), (std::vector<int>{0, 2, 3}));
  EXPECT_EQ(p.slot(0), 0);
  EXPECT_EQ(p.slot(2), 1);
  EXPECT_EQ(p.slot(3), 2);
  EXPECT_EQ(p.slot(4), 1);
  EXPECT_NE(p.describe().find("r1=[0,2,3]"), std::string::npos) << p.describe();
}

TEST(Placement, ExplicitOwnersRejectBadRanksAndEmptyRanks) {
  try {
    ExpertPlacement::from_owners({0, 2}, 2);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kConfig);
    EXPECT_NE(std::string(e.what()).find("expert 1"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ExpertPlacement::from_owners({0, -1}, 2), Error);
  try {
    ExpertPlacement::from_owners({0, 0, 2}, 3);  // rank 1 owns nothing
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kConfig);
    EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ExpertPlacement::from_owners({}, 1), Error);
}
