// BLIS GEMM against the naive double-accumulating reference: every transpose combination,
// strided views, beta handling, and 1-thread calls inside an OpenMP loop.
#include "runtime/gemm.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <random>

using moe::ConstView;
using moe::Tensor;
using moe::Trans;
using moe::View;

using moe::test::randomize;

class GemmTransposes : public testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(GemmTransposes, MatchesReference) {
  auto [tra, trb] = GetParam();
  const int64_t m = 37, n = 53, k = 71;
  Tensor a(tra ? std::initializer_list<int64_t>{k, m} : std::initializer_list<int64_t>{m, k});
  Tensor b(trb ? std::initializer_list<int64_t>{n, k} : std::initializer_list<int64_t>{k, n});
  Tensor c({m, n}), ref({m, n});
  randomize(a.view(), 1);
  randomize(b.view(), 2);
  randomize(c.view(), 3);
  moe::copy(c.view(), ref.view());
  Trans ta = tra ? Trans::kYes : Trans::kNo, tb = trb ? Trans::kYes : Trans::kNo;
  moe::gemm(ta, tb, 0.5f, a.view(), b.view(), 2.0f, c.view());
  moe::gemm_reference(ta, tb, 0.5f, a.view(), b.view(), 2.0f, ref.view());
  // fp32 accumulation over k = 71 terms of size <= 1: a few ulps of the row sums.
  EXPECT_LT(moe::max_rel_error(c.view(), ref.view()), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(All, GemmTransposes, testing::Combine(testing::Bool(), testing::Bool()));

TEST(Gemm, StridedViewsAndBetaZeroClearsNaN) {
  // Operate on interior windows of larger buffers; the margins must stay untouched.
  Tensor a({40, 50}), b({60, 70}), c({30, 90}), ref({30, 90});
  randomize(a.view(), 4);
  randomize(b.view(), 5);
  c.fill(std::nanf(""));
  ref.fill(std::nanf(""));
  ConstView av = a.view().row_range(3, 20).col_range(5, 33);  // [20, 33], ld 50
  ConstView bv = b.view().row_range(1, 33).col_range(7, 25);  // [33, 25], ld 70
  View cv = c.view().row_range(2, 20).col_range(11, 25);      // [20, 25], ld 90
  View rv = ref.view().row_range(2, 20).col_range(11, 25);
  moe::gemm(Trans::kNo, Trans::kNo, 1.0f, av, bv, 0.0f, cv);
  moe::gemm_reference(Trans::kNo, Trans::kNo, 1.0f, av, bv, 0.0f, rv);
  EXPECT_LT(moe::max_rel_error(cv, rv), 1e-5);
  EXPECT_TRUE(std::isnan(c.view()(0, 0)));   // outside the window
  EXPECT_TRUE(std::isnan(c.view()(2, 10)));  // left of the window
}

TEST(Gemm, ShapeMismatchThrowsWithBothShapes) {
  Tensor a({4, 5}), b({6, 7}), c({4, 7});
  try {
    moe::gemm(Trans::kNo, Trans::kNo, 1.0f, a.view(), b.view(), 0.0f, c.view());
    FAIL();
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("[4, 5] x op(B) [6, 7]"), std::string::npos) << e.what();
  }
}

TEST(Gemm, EmptyAndZeroInnerDimension) {
  Tensor a({3, 0}), b({0, 4}), c({3, 4});
  c.fill(7.0f);
  moe::gemm(Trans::kNo, Trans::kNo, 1.0f, a.view(), b.view(), 0.5f, c.view());
  EXPECT_EQ(c[0], 3.5f);
  Tensor e({0, 5}), f({5, 2}), g({0, 2});
  moe::gemm(Trans::kNo, Trans::kNo, 1.0f, e.view(), f.view(), 0.0f, g.view());  // no-op
}

TEST(Gemm, PerExpertCallsInsideOpenMPLoopMatchSerial) {
  const int n_experts = 6;
  Tensor x({n_experts, 17, 32}), w({n_experts, 32, 24}), y({n_experts, 17, 24}),
      ref({n_experts, 17, 24});
  randomize(x.view(), 6);
  randomize(w.view(), 7);
#pragma omp parallel for schedule(dynamic, 1) num_threads(2)
  for (int e = 0; e < n_experts; ++e)
    moe::gemm(Trans::kNo, Trans::kNo, 1.0f, x.slab(e), w.slab(e), 0.0f, y.slab(e));
  for (int e = 0; e < n_experts; ++e)
    moe::gemm_reference(Trans::kNo, Trans::kNo, 1.0f, x.slab(e), w.slab(e), 0.0f, ref.slab(e));
  EXPECT_LT(moe::max_rel_error(y.view(), ref.view()), 1e-5);
}

// The packed kernel (inference): every row count of a register block and a ragged last panel,
// a strided A and C (the C margin stays untouched), and row results that do not depend on how
// many rows share the call (bit-equal), which keeps decoding independent of the batch.
TEST(GemmPacked, MatchesReferenceAndRowsAreIndependent) {
  const int64_t k = 45, n = 70;  // n: two full panels of 32 and one of 6
  Tensor b({k, n});
  randomize(b.view(), 4);
  moe::PackedB packed;
  moe::pack_b(b.view(), packed);
  EXPECT_EQ(packed.k, k);
  EXPECT_EQ(packed.n, n);
  for (int64_t m : {1, 3, 8, 9, 17}) {
    Tensor abuf({m, k + 3}), cbuf({m, n + 5}), ref({m, n});
    randomize(abuf.view(), 5);
    cbuf.fill(7.0f);
    ConstView a = ConstView(abuf.view()).col_range(1, k);
    View c = cbuf.view().col_range(2, n);
    moe::gemm_packed(a, packed, c);
    moe::gemm_reference(Trans::kNo, Trans::kNo, 1.0f, a, b.view(), 0.0f, ref.view());
    EXPECT_LT(moe::max_rel_error(c, ref.view()), 1e-5) << "m = " << m;
    for (int64_t i = 0; i < m; ++i) {
      EXPECT_EQ(cbuf.view()(i, 0), 7.0f);
      EXPECT_EQ(cbuf.view()(i, 1), 7.0f);
      for (int64_t j = n + 2; j < n + 5; ++j) EXPECT_EQ(cbuf.view()(i, j), 7.0f);
      Tensor one({1, n});
      moe::gemm_packed(a.row_range(i, 1), packed, one.view());
      for (int64_t j = 0; j < n; ++j) ASSERT_EQ(one.view()(0, j), c(i, j)) << i << ", " << j;
    }
  }
  Tensor wrong({2, n + 1});
  EXPECT_THROW(moe::gemm_packed(ConstView(wrong.view()).col_range(0, k), packed, wrong.view()),
               moe::Error);
}
