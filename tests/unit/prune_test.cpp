// The algorithms of moe-prune (model/prune.hpp), one process: spectral clustering recovers
// planted groups of experts built as noisy copies of a few prototypes; the Hungarian algorithm
// matches brute force; alignment recovers a known permutation of hidden neurons exactly (GELU
// and SwiGLU), and merging aligned permuted copies gives back the reference while merging
// them unaligned does not; the frequency baseline keeps the most routed experts.
#include "model/prune.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

using moe::ConstView;
using moe::Tensor;
using moe::model::Activation;

namespace {

// Profiles [n, T] of n experts: expert i is prototype planted[i] plus Gaussian noise of
// relative size `noise`, and a per-token shift common to all experts (softmax ignores it).
std::vector<float> planted_profiles(const std::vector<int>& planted, int n_proto, int64_t T,
                                    double noise, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, 1.0);
  std::vector<double> proto(static_cast<size_t>(n_proto * T)), shift(static_cast<size_t>(T));
  for (double& x : proto) x = g(rng);
  for (double& x : shift) x = 3.0 * g(rng);
  const int n = static_cast<int>(planted.size());
  std::vector<float> p(static_cast<size_t>(n * T));
  for (int i = 0; i < n; ++i)
    for (int64_t t = 0; t < T; ++t)
      p[static_cast<size_t>(i * T + t)] =
          static_cast<float>(proto[static_cast<size_t>(planted[static_cast<size_t>(i)] * T + t)] +
                             noise * g(rng) + shift[static_cast<size_t>(t)]);
  return p;
}

// True when two labelings define the same partition.
bool same_partition(const std::vector<int>& a, const std::vector<int>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a.size(); ++j)
      if ((a[i] == a[j]) != (b[i] == b[j])) return false;
  return true;
}

Tensor random_matrix(int64_t rows, int64_t cols, std::mt19937_64& rng) {
  Tensor t({rows, cols});
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = g(rng);
  return t;
}

}  // namespace

TEST(SpectralCluster, RecoversPlantedGroups) {
  // 16 experts from 4 prototypes, shuffled; groups of unequal size (3, 4, 4, 5).
  std::vector<int> planted = {0, 1, 2, 3, 0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 0, 3};
  std::shuffle(planted.begin(), planted.end(), std::mt19937_64(5));
  for (double noise : {0.05, 0.5}) {
    const auto p = planted_profiles(planted, 4, 256, noise, 11);
    const auto g = moe::model::spectral_cluster(p, 16, 256, 4, 3);
    EXPECT_TRUE(same_partition(g, planted)) << "noise " << noise;
    EXPECT_EQ(g, moe::model::spectral_cluster(p, 16, 256, 4, 3)) << "deterministic for a seed";
    EXPECT_EQ(*std::max_element(g.begin(), g.end()), 3);
    EXPECT_EQ(g[0], 0) << "groups numbered by their smallest member";
  }
}

TEST(SpectralCluster, IdentityAndOneGroup) {
  const std::vector<int> planted = {0, 0, 1, 1, 2, 2};
  const auto p = planted_profiles(planted, 3, 64, 0.1, 1);
  EXPECT_EQ(moe::model::spectral_cluster(p, 6, 64, 6, 0), (std::vector<int>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(moe::model::spectral_cluster(p, 6, 64, 1, 0), (std::vector<int>(6, 0)));
  // Identical profiles: still exactly k non-empty groups.
  const std::vector<float> same(6 * 64, 1.0f);
  auto g = moe::model::spectral_cluster(same, 6, 64, 3, 0);
  std::sort(g.begin(), g.end());
  EXPECT_EQ(std::unique(g.begin(), g.end()) - g.begin(), 3);
}

TEST(Hungarian, MatchesBruteForce) {
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int trial = 0; trial < 20; ++trial) {
    const int n = 1 + trial % 7;
    std::vector<double> c(static_cast<size_t>(n * n));
    for (double& x : c) x = trial % 3 == 0 ? std::round(3 * u(rng)) : u(rng);  // ties too
    const auto col = moe::model::hungarian(c, n);
    double got = 0;
    for (int i = 0; i < n; ++i) got += c[static_cast<size_t>(i * n + col[static_cast<size_t>(i)])];
    std::vector<int> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), 0);
    double best = 1e300;
    do {
      double s = 0;
      for (int i = 0; i < n; ++i) s += c[static_cast<size_t>(i * n + perm[static_cast<size_t>(i)])];
      best = std::min(best, s);
    } while (std::next_permutation(perm.begin(), perm.end()));
    EXPECT_NEAR(got, best, 1e-9) << "n " << n;
    std::vector<int> sorted = col;
    std::sort(sorted.begin(), sorted.end());
    for (int i = 0; i < n; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
  }
}

TEST(Alignment, RecoversKnownPermutationExactly) {
  for (Activation act : {Activation::kGelu, Activation::kSwiglu}) {
    const int64_t d = 32, f = 96, f1 = act == Activation::kSwiglu ? 2 * f : f;
    std::mt19937_64 rng(7);
    Tensor w1 = random_matrix(d, f1, rng), w2 = random_matrix(f, d, rng);
    std::vector<int> perm(static_cast<size_t>(f));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    // b = a with its neurons permuted (neuron j of b is neuron inv[j] of a), plus small noise.
    Tensor b1({d, f1}), b2({f, d});
    std::vector<int> inv(static_cast<size_t>(f));
    for (int64_t j = 0; j < f; ++j)
      inv[static_cast<size_t>(perm[static_cast<size_t>(j)])] = static_cast<int>(j);
    moe::model::permute_neurons(w1.view(), w2.view(), inv, act, b1.view(), b2.view());
    std::normal_distribution<float> g(0.0f, 0.01f);
    for (int64_t i = 0; i < b1.numel(); ++i) b1.data()[i] += g(rng);
    const auto got = moe::model::align_neurons(w1.view(), b1.view(), act);
    EXPECT_EQ(got, perm) << moe::model::activation_name(act);

    // Merging the reference with an exact permuted copy: aligned gives the reference back
    // (weights 0.3 / 0.7), unaligned does not.
    moe::model::permute_neurons(w1.view(), w2.view(), inv, act, b1.view(), b2.view());
    moe::model::MergeGroup mg{{0, 1}, {0.3, 0.7}, 0};
    Tensor m1({d, f1}), m2({f, d});
    const std::vector<ConstView> w1s = {w1.view(), b1.view()}, w2s = {w2.view(), b2.view()};
    moe::model::merge_group(mg, w1s, w2s, act, moe::model::PruneMethod::kMerge, m1.view(),
                            m2.view());
    double err = 0;
    for (int64_t i = 0; i < m1.numel(); ++i)
      err = std::max(err, double(std::abs(m1.data()[i] - w1.data()[i])));
    for (int64_t i = 0; i < m2.numel(); ++i)
      err = std::max(err, double(std::abs(m2.data()[i] - w2.data()[i])));
    EXPECT_LT(err, 1e-5);
    moe::model::merge_group(mg, w1s, w2s, act, moe::model::PruneMethod::kMergeNoAlign, m1.view(),
                            m2.view());
    err = 0;
    for (int64_t i = 0; i < m1.numel(); ++i)
      err = std::max(err, double(std::abs(m1.data()[i] - w1.data()[i])));
    EXPECT_GT(err, 0.1);
  }
}

TEST(PlanLayer, FrequencyKeepsTheMostRouted) {
  const std::vector<int64_t> freq = {5, 50, 0, 20, 20, 1};
  const auto plan = moe::model::plan_layer(0, std::vector<float>(6 * 4, 0.0f), 6, 4, freq, 3,
                                           moe::model::PruneMethod::kFrequency, 0);
  ASSERT_EQ(plan.groups.size(), 3u);
  EXPECT_EQ(plan.groups[0].members, std::vector<int>{1});
  EXPECT_EQ(plan.groups[1].members, std::vector<int>{3});
  EXPECT_EQ(plan.groups[2].members, std::vector<int>{4});
}

TEST(PlanLayer, MergeWeightsAreFrequencies) {
  const std::vector<int> planted = {0, 0, 1, 1};
  const auto p = planted_profiles(planted, 2, 64, 0.01, 4);
  const auto plan =
      moe::model::plan_layer(0, p, 4, 64, {10, 30, 0, 0}, 2, moe::model::PruneMethod::kMerge, 0);
  ASSERT_EQ(plan.groups.size(), 2u);
  EXPECT_EQ(plan.groups[0].members, (std::vector<int>{0, 1}));
  EXPECT_EQ(plan.groups[0].reference, 1);
  EXPECT_DOUBLE_EQ(plan.groups[0].weights[0], 0.25);
  EXPECT_DOUBLE_EQ(plan.groups[1].weights[0], 0.5);  // no tokens: uniform
  Tensor w({2, 4}), out({2, 2});
  for (int i = 0; i < 8; ++i) w.data()[i] = static_cast<float>(i);
  moe::model::merge_router(w.view(), plan, out.view());
  EXPECT_FLOAT_EQ(out.data()[0], 0.25f * 0 + 0.75f * 1);
  EXPECT_FLOAT_EQ(out.data()[3], 0.5f * 6 + 0.5f * 7);
}

TEST(DecodeTraffic, FromTheConfig) {
  // 8 experts on 2 ranks, 4 tokens, k 2, d 64: 2 * 4 * 2 * 64 * 4 bytes, one message each way.
  auto t = moe::model::decode_traffic(4, 2, 64, 2, {1, 1, 1, 1, 1, 1, 1, 1});
  EXPECT_EQ(t.ranks_with_experts, 2);
  EXPECT_EQ(t.messages, 2);
  EXPECT_DOUBLE_EQ(t.bytes_all, 4096.0);
  EXPECT_DOUBLE_EQ(t.bytes_remote, 2048.0);
  t = moe::model::decode_traffic(4, 2, 64, 4, {1, 1});  // 2 experts: 2 of 4 ranks hold them
  EXPECT_EQ(t.ranks_with_experts, 2);
  t = moe::model::decode_traffic(4, 2, 64, 1, {1, 1});
  EXPECT_EQ(t.messages, 0);
  EXPECT_DOUBLE_EQ(t.bytes_remote, 0.0);
}
