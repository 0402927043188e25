// Communicator collectives and collective error agreement, under mpirun -np 2 and 4.
#include "comm/communicator.hpp"

#include <gtest/gtest.h>

using moe::Error;
using moe::ErrorKind;
using moe::comm::Communicator;

TEST(Communicator, SumMaxAndBroadcast) {
  Communicator w = Communicator::world();
  int p = w.size();
  double v = w.rank() + 1;
  EXPECT_DOUBLE_EQ(w.sum(v), p * (p + 1) / 2.0);
  EXPECT_EQ(w.max(w.rank()), p - 1);
  std::string s = w.rank() == p - 1 ? "from the last rank" : "";
  w.broadcast(s, p - 1);
  EXPECT_EQ(s, "from the last rank");
  std::vector<int64_t> ranks = w.allgather<int64_t>(w.rank());
  for (int r = 0; r < p; ++r) EXPECT_EQ(ranks[r], r);
}

TEST(Communicator, AnyIsTrueEverywhereWhenOneRankSaysSo) {
  Communicator w = Communicator::world();
  EXPECT_TRUE(w.any(w.rank() == w.size() - 1));
  EXPECT_FALSE(w.any(false));
}

TEST(Communicator, AgreeThrowsTheSameErrorOnEveryRank) {
  Communicator w = Communicator::world();
  EXPECT_NO_THROW(w.agree("", ErrorKind::kConfig));
  // Ranks 1.. report problems; every rank must see rank 1's message.
  std::string mine = w.rank() >= 1 ? moe::cat("bad thing on ", w.rank()) : "";
  try {
    w.agree(mine, ErrorKind::kData);
    FAIL() << "agree did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kData);
    EXPECT_STREQ(e.what(), "rank 1: bad thing on 1");
  }
}

TEST(Communicator, NodeSplitCoversTheWorldOnOneHost) {
  Communicator w = Communicator::world();
  Communicator node = w.split_node();
  EXPECT_EQ(node.size(), w.size());  // all test ranks run on this one machine
  EXPECT_EQ(node.sum(1), w.size());
}
