// TopKRouter: forward against a double-precision reference, backward (weights path, load-balancing
// loss and z-loss) against central finite differences of that reference, top-k ties and
// renormalisation on/off. Single process: a null communicator makes this rank the whole batch.
#include "model/routers/topk.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <tuple>
#include <vector>

using moe::ConstView;
using moe::Tensor;
using moe::View;
using moe::model::RouteResult;
using moe::model::TopKOptions;
using moe::model::TopKRouter;

using moe::test::randomize;

namespace {

// The router's loss in double for a FIXED selection (ids) and fixed counts (f has no gradient):
//   L = sum_tj c_tj w_tj + s (a LB + b Z)
struct Reference {
  int64_t T, d;
  int E, k;
  bool renorm;
  double a, b, s;
  std::vector<int32_t> ids;  // [T, k]
  std::vector<double> c;     // [T, k]

  double loss(const std::vector<double>& x, const std::vector<double>& w,
              std::vector<double>* weights = nullptr, double* lb_out = nullptr,
              double* z_out = nullptr) const {
    std::vector<double> count(E, 0.0), psum(E, 0.0);
    for (int32_t e : ids) count[e] += 1.0;
    double main = 0.0, zsum = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> l(E, 0.0);
      for (int i = 0; i < E; ++i)
        for (int64_t p = 0; p < d; ++p) l[i] += x[t * d + p] * w[p * E + i];
      double m = l[0];
      for (int i = 1; i < E; ++i) m = std::max(m, l[i]);
      double sum = 0.0;
      for (int i = 0; i < E; ++i) sum += std::exp(l[i] - m);
      const double lse = m + std::log(sum);
      zsum += lse * lse;
      std::vector<double> p(E);
      for (int i = 0; i < E; ++i) p[i] = std::exp(l[i] - lse), psum[i] += p[i];
      double sel = 0.0;
      for (int j = 0; j < k; ++j) sel += p[ids[t * k + j]];
      for (int j = 0; j < k; ++j) {
        double wt = p[ids[t * k + j]] / (renorm ? sel : 1.0);
        if (weights) weights->push_back(wt);
        main += c[t * k + j] * wt;
      }
    }
    double lb = 0.0;
    for (int i = 0; i < E; ++i) lb += count[i] / double(T * k) * psum[i] / double(T);
    lb *= E;
    const double z = zsum / double(T);
    if (lb_out) *lb_out = lb;
    if (z_out) *z_out = z;
    return main + s * (a * lb + b * z);
  }
};

std::vector<double> to_double(ConstView v) {
  std::vector<double> out;
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) out.push_back(v(i, j));
  return out;
}

// max |analytic - fd| / max |fd|
double grad_error(ConstView analytic, const std::vector<double>& fd) {
  double num = 0.0, den = 1e-12;
  for (int64_t i = 0; i < analytic.rows; ++i)
    for (int64_t j = 0; j < analytic.cols; ++j) {
      double g = fd[i * analytic.cols + j];
      num = std::max(num, std::abs(analytic(i, j) - g));
      den = std::max(den, std::abs(g));
    }
  return num / den;
}

}  // namespace

class RouterGrad : public testing::TestWithParam<std::tuple<int, bool>> {};

// fp32 forward/backward vs the double reference. Tolerance: the analytic gradient is computed
// in fp32 (softmax, one GEMM of depth E or T), so its normwise error is a few hundred ulps at
// most (~1e-5); the double central difference with h = 1e-6 is accurate to ~1e-9. 1e-4 leaves
// a 10x margin and still catches any missing term (the smallest term here is ~1e-2 of the norm).
TEST_P(RouterGrad, MatchesFiniteDifferencesOfDoubleReference) {
  auto [k, renorm] = GetParam();
  const int64_t T = 9, d = 6;
  const int E = 5;
  TopKOptions opt{E, k, renorm, 0.3, 0.2};
  TopKRouter router(d, opt, nullptr, 42);
  randomize(router.w().view(), 7, 0.8f);
  Tensor x({T, d});
  randomize(x.view(), 11);
  RouteResult r;
  router.forward(x.view(), r);

  Reference ref{T, d, E, k, renorm, opt.aux_loss_coef, opt.z_loss_coef, 0.7, r.expert, {}};
  Tensor dweight({T, k});
  randomize(dweight.view(), 13);
  for (int64_t i = 0; i < T * k; ++i) ref.c.push_back(dweight[i]);

  std::vector<double> xd = to_double(x.view()), wd = to_double(router.w().view());
  std::vector<double> wref;
  double lb = 0, z = 0;
  ref.loss(xd, wd, &wref, &lb, &z);
  for (int64_t i = 0; i < T * k; ++i) EXPECT_NEAR(r.weight[i], wref[i], 1e-6) << i;
  EXPECT_NEAR(r.load_balance_loss, lb, 1e-6 * lb);
  EXPECT_NEAR(r.z_loss, z, 1e-6 * z);
  EXPECT_NEAR(r.aux_loss, 0.3 * lb + 0.2 * z, 1e-6);
  int64_t routed = 0;
  for (int64_t n : r.expert_slots) routed += n;
  EXPECT_EQ(routed, T * k);

  Tensor dx({T, d});
  router.backward(dweight.view(), 0.7f, dx.view());

  const double h = 1e-6;
  auto fd = [&](std::vector<double>& v) {
    std::vector<double> g(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const double old = v[i];
      v[i] = old + h;
      double lp = ref.loss(xd, wd);
      v[i] = old - h;
      double lm = ref.loss(xd, wd);
      v[i] = old;
      g[i] = (lp - lm) / (2 * h);
    }
    return g;
  };
  EXPECT_LT(grad_error(dx.view(), fd(xd)), 1e-4);
  EXPECT_LT(grad_error(router.dw().view(), fd(wd)), 1e-4);

  // backward accumulates: a second call doubles dW and adds to dx.
  Tensor dw1 = router.dw().clone();
  router.backward(dweight.view(), 0.7f, dx.view());
  for (int64_t i = 0; i < dw1.numel(); ++i) EXPECT_NEAR(router.dw()[i], 2 * dw1[i], 1e-5);
}

INSTANTIATE_TEST_SUITE_P(KAndRenorm, RouterGrad,
                         testing::Combine(testing::Values(1, 2, 3), testing::Bool()));

TEST(Router, AuxLossesAloneHaveGradients) {
  // With dL/dweight = 0 only the load-balancing and z-loss terms remain; they must not vanish.
  const int64_t T = 8, d = 4;
  TopKRouter router(d, TopKOptions{4, 2, true, 1.0, 1.0}, nullptr, 3);
  Tensor x({T, d}), dweight({T, 2}), dx({T, d});
  randomize(x.view(), 5);
  RouteResult r;
  router.forward(x.view(), r);
  router.backward(dweight.view(), 1.0f, dx.view());
  double norm = 0;
  for (int64_t i = 0; i < router.dw().numel(); ++i) norm += std::abs(router.dw()[i]);
  EXPECT_GT(norm, 1e-4);
}

TEST(Router, TiesGoToTheLowerExpertId) {
  const int64_t T = 3, d = 4;
  const int E = 6;
  for (bool renorm : {false, true}) {
    TopKRouter router(d, TopKOptions{E, 3, renorm, 0.0, 0.0}, nullptr, 1);
    // All logits equal: experts 0, 1, 2 in that order.
    router.w().zero();
    Tensor x({T, d});
    randomize(x.view(), 9);
    RouteResult r;
    router.forward(x.view(), r);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < 3; ++j) {
        EXPECT_EQ(r.expert[t * 3 + j], j);
        EXPECT_FLOAT_EQ(r.weight[t * 3 + j], renorm ? 1.0f / 3 : 1.0f / E);
      }
    // Experts 4 and 1 tie for the top, 5 is next: order 1, 4, 5.
    View w = router.w().view();
    w.fill(0.0f);
    for (int64_t p = 0; p < d; ++p) w(p, 1) = w(p, 4) = 2.0f, w(p, 5) = 1.0f;
    x.fill(1.0f);
    router.forward(x.view(), r);
    for (int64_t t = 0; t < T; ++t) {
      EXPECT_EQ(r.expert[t * 3 + 0], 1);
      EXPECT_EQ(r.expert[t * 3 + 1], 4);
      EXPECT_EQ(r.expert[t * 3 + 2], 5);
      EXPECT_EQ(r.weight[t * 3 + 0], r.weight[t * 3 + 1]);
    }
  }
}

TEST(Router, RenormalisedWeightsSumToOne) {
  const int64_t T = 16, d = 8;
  Tensor x({T, d});
  randomize(x.view(), 21);
  for (int k : {1, 2, 4}) {
    TopKRouter on(d, TopKOptions{8, k, true, 0.01, 0.001}, nullptr, 5);
    TopKRouter off(d, TopKOptions{8, k, false, 0.01, 0.001}, nullptr, 5);
    RouteResult a, b;
    on.forward(x.view(), a);
    off.forward(x.view(), b);
    for (int64_t t = 0; t < T; ++t) {
      double sa = 0, sb = 0;
      for (int j = 0; j < k; ++j) {
        EXPECT_EQ(a.expert[t * k + j], b.expert[t * k + j]);
        if (j > 0) {
          EXPECT_GE(b.weight[t * k + j - 1], b.weight[t * k + j]);
        }
        sa += a.weight[t * k + j];
        sb += b.weight[t * k + j];
      }
      EXPECT_NEAR(sa, 1.0, 1e-6);
      EXPECT_LT(sb, 1.0 + 1e-6);
      for (int j = 0; j < k; ++j) EXPECT_NEAR(a.weight[t * k + j], b.weight[t * k + j] / sb, 1e-6);
    }
  }
}
