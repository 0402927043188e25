// BLIS GEMM against the naive double-accumulating reference: every transpose combination,
// strided views, beta handling, and 1-thread calls inside an OpenMP loop.
#include "runtime/gemm.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
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

// bf16 rounding: hand values around ties (to even), the largest finite values, Inf and NaN.
TEST(Bf16, RoundsToNearestEven) {
  auto bits = [](uint32_t u) {
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  };
  EXPECT_EQ(moe::float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(moe::float_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(moe::float_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(moe::float_to_bf16(-0.0f), 0x8000);
  // 1 + 2^-8 is half way between 1 and 1 + 2^-7: ties to the even 1.
  EXPECT_EQ(moe::float_to_bf16(bits(0x3f808000)), 0x3f80);
  // 1 + 3 * 2^-8 is half way between 1 + 2^-7 (odd) and 1 + 2^-6: up to the even one.
  EXPECT_EQ(moe::float_to_bf16(bits(0x3f818000)), 0x3f82);
  // Just above and below a tie go to the nearer value.
  EXPECT_EQ(moe::float_to_bf16(bits(0x3f808001)), 0x3f81);
  EXPECT_EQ(moe::float_to_bf16(bits(0x3f807fff)), 0x3f80);
  EXPECT_EQ(moe::float_to_bf16(bits(0xbf808001)), 0xbf81);  // the sign is kept
  // pi = 0x40490fdb -> 0x4049 (3.140625).
  EXPECT_EQ(moe::float_to_bf16(3.14159265f), 0x4049);
  EXPECT_EQ(moe::bf16_to_float(0x4049), 3.140625f);
  // Subnormals round like any other value.
  EXPECT_EQ(moe::float_to_bf16(bits(0x00008000)), 0x0000);
  EXPECT_EQ(moe::float_to_bf16(bits(0x00018000)), 0x0002);
  // The largest float rounds up to Inf; the largest bf16 stays; Inf stays Inf.
  EXPECT_EQ(moe::float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(moe::float_to_bf16(bits(0x7f7f0000)), 0x7f7f);
  EXPECT_EQ(moe::float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(moe::float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  // NaN stays NaN (also one whose payload is only in the dropped bits), sign kept.
  EXPECT_TRUE(std::isnan(moe::bf16_to_float(moe::float_to_bf16(bits(0x7f800001)))));
  EXPECT_TRUE(std::isnan(moe::bf16_to_float(moe::float_to_bf16(bits(0xffc00000)))));
  EXPECT_EQ(moe::float_to_bf16(bits(0xffc00000)) & 0x8000, 0x8000);
  // Every bf16 value survives the round trip, and round_to_bf16 is idempotent.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float x = moe::bf16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(x)) {
      ASSERT_EQ(moe::float_to_bf16(x), h);
    }
  }
  Tensor t({3, 5});
  randomize(t.view(), 9);
  moe::round_to_bf16(t.view());
  Tensor u({3, 5});
  moe::copy(t.view(), u.view());
  moe::round_to_bf16(u.view());
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 5; ++j) {
      ASSERT_EQ(t.view()(i, j), u.view()(i, j));
      uint32_t v;
      std::memcpy(&v, &t.view()(i, j), sizeof(v));
      ASSERT_EQ(v & 0xffffu, 0u);
    }
  EXPECT_EQ(moe::parse_weight_type("bf16"), moe::WeightType::kBf16);
  EXPECT_EQ(moe::parse_weight_type("fp32"), moe::WeightType::kFp32);
  EXPECT_THROW(moe::parse_weight_type("fp16"), moe::Error);
}

// The bf16 packed kernel widens each weight exactly and runs the fp32 kernel's FMA chain: on
// odd shapes (ragged last panels, every row count of a register block and beyond) it equals
// the fp32 packed kernel on the rounded weights bit for bit, and holds half the bytes.
TEST(GemmPacked, Bf16EqualsFp32OnRoundedWeightsBitwise) {
  for (auto [k, n] : {std::pair<int64_t, int64_t>{45, 70}, {16, 31}, {33, 97}, {7, 1}}) {
    Tensor b({k, n}), rounded({k, n});
    randomize(b.view(), 11);
    moe::copy(b.view(), rounded.view());
    moe::round_to_bf16(rounded.view());
    moe::PackedB p16, p32;
    moe::pack_b_bf16(b.view(), p16);
    moe::pack_b(rounded.view(), p32);
    EXPECT_EQ(p16.type, moe::WeightType::kBf16);
    EXPECT_EQ(p16.k, k);
    EXPECT_EQ(p16.n, n);
    EXPECT_EQ(2 * p16.bytes(), p32.bytes());
    for (int64_t m = 1; m <= 17; ++m) {
      if (m > 9 && m < 17) continue;
      Tensor abuf({m, k + 3}), c16({m, n}), c32({m, n}), ref({m, n});
      randomize(abuf.view(), 12 + m);
      ConstView a = ConstView(abuf.view()).col_range(2, k);
      moe::gemm_packed(a, p16, c16.view());
      moe::gemm_packed(a, p32, c32.view());
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          ASSERT_EQ(std::memcmp(&c16.view()(i, j), &c32.view()(i, j), sizeof(float)), 0)
              << "k " << k << " n " << n << " m " << m << " (" << i << ", " << j << ")";
      // And both are a GEMM on the rounded weights.
      moe::gemm_reference(Trans::kNo, Trans::kNo, 1.0f, a, rounded.view(), 0.0f, ref.view());
      EXPECT_LT(moe::max_rel_error(c16.view(), ref.view()), 1e-5) << "m = " << m;
    }
  }
}
