// Product-key top-k against a brute force over all N = n^2 keys: the same experts, in the same
// order, with scores within 1e-5 (relative to the largest |score|), for several n, k, dk.
#include "model/routers/product_key.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

using moe::Tensor;
using moe::model::product_key_brute_force;
using moe::model::product_key_topk;
using moe::model::ProductKeyScratch;

namespace {

void check(int64_t M, int64_t n, int64_t dk, int k, uint32_t seed) {
  SCOPED_TRACE(testing::Message() << "M " << M << " n " << n << " dk " << dk << " k " << k);
  Tensor q({M, dk}), c1({n, dk / 2}), c2({n, dk / 2});
  moe::test::randomize(q.view(), seed);
  moe::test::randomize(c1.view(), seed + 1);
  moe::test::randomize(c2.view(), seed + 2);
  std::vector<int32_t> ids(static_cast<size_t>(M * k)), ref_ids;
  std::vector<float> scores(static_cast<size_t>(M * k)), ref_scores;
  ProductKeyScratch scratch;
  product_key_topk(q.view(), c1.view(), c2.view(), k, scratch, ids.data(), scores.data());
  product_key_brute_force(q.view(), c1.view(), c2.view(), k, ref_ids, ref_scores);
  float top = 0;
  for (float s : ref_scores) top = std::max(top, std::fabs(s));
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSERT_EQ(ids[i], ref_ids[i]) << "row " << i / k << " rank " << i % k;
    ASSERT_NEAR(scores[i], ref_scores[i], 1e-5 * top) << "row " << i / k << " rank " << i % k;
  }
}

TEST(ProductKey, MatchesBruteForce) {
  check(37, 8, 8, 3, 1);
  check(20, 16, 16, 16, 2);  // k = n: every sub-key is a candidate
  check(50, 32, 12, 5, 3);
  check(9, 5, 4, 1, 4);  // n not a power of two, k = 1
}

TEST(ProductKey, NoRowsIsFine) {
  Tensor q({1, 8}), c1({4, 4}), c2({4, 4});
  ProductKeyScratch scratch;
  product_key_topk(moe::ConstView(q.data(), 0, 8), c1.view(), c2.view(), 2, scratch, nullptr,
                   nullptr);
}

TEST(ProductKey, RejectsKAboveN) {
  Tensor q({2, 8}), c1({4, 4}), c2({4, 4});
  std::vector<int32_t> ids(10);
  std::vector<float> s(10);
  ProductKeyScratch scratch;
  EXPECT_THROW(product_key_topk(q.view(), c1.view(), c2.view(), 5, scratch, ids.data(), s.data()),
               moe::Error);
}

}  // namespace
