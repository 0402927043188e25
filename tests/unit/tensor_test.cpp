#include "runtime/tensor.hpp"

#include <gtest/gtest.h>

#include <cstdint>

using moe::Tensor;
using moe::View;

TEST(Tensor, IsAlignedZeroedAndShaped) {
  Tensor t({3, 5, 7});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
  EXPECT_EQ(t.rank(), 3);
  EXPECT_EQ(t.numel(), 105);
  EXPECT_EQ(t.shape_string(), "[3, 5, 7]");
  for (int64_t i = 0; i < t.numel(); ++i) EXPECT_EQ(t[i], 0.0f);
}

TEST(Tensor, ViewsBorrowWithoutCopying) {
  Tensor t({2, 3, 4});
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(i);
  View m = t.view();
  EXPECT_EQ(m.rows, 6);
  EXPECT_EQ(m.cols, 4);
  EXPECT_EQ(m.data, t.data());
  View s1 = t.slab(1);
  EXPECT_EQ(s1.rows, 3);
  EXPECT_EQ(s1(0, 0), 12.0f);
  View c = m.col_range(1, 2).row_range(2, 3);
  EXPECT_EQ(c.ld, 4);
  EXPECT_EQ(c(0, 0), 9.0f);  // row 2, column 1
  c(0, 0) = -1.0f;
  EXPECT_EQ(t[9], -1.0f);  // writes land in the owner
}

TEST(Tensor, MoveTransfersOwnershipAndCloneCopies) {
  Tensor a({4});
  a.fill(2.0f);
  float* p = a.data();
  Tensor b = std::move(a);
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);
  Tensor c = b.clone();
  EXPECT_NE(c.data(), b.data());
  EXPECT_EQ(c[3], 2.0f);
}

TEST(Tensor, ResizeReusesCapacity) {
  Tensor a({100});
  float* p = a.data();
  a.resize({10, 5});
  EXPECT_EQ(a.data(), p);
  EXPECT_EQ(a.numel(), 50);
}

TEST(Tensor, ShapeErrorsNameBothShapes) {
  Tensor a({2, 3}), b({3, 2});
  try {
    moe::copy(a.view(), b.view());
    FAIL();
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("[3, 2], expected [2, 3]"), std::string::npos) << e.what();
  }
}

TEST(Tensor, RelativeErrorIsNormwise) {
  Tensor a({2, 2}), b({2, 2});
  b.fill(10.0f);
  a.fill(10.0f);
  a[1] = 10.01f;
  EXPECT_NEAR(moe::max_rel_error(a.view(), b.view()), 1e-3, 1e-6);
}
