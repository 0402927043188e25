// ExpertBank: forward against a double-precision reference, backward (dX, dW1, dW2; GELU and
// SwiGLU) against central finite differences of that reference, empty experts, gradient
// accumulation, and thread-count independence of the blocked OpenMP schedule.
#include "model/experts.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <vector>

using moe::ConstView;
using moe::Tensor;
using moe::View;
using moe::model::Activation;
using moe::model::ExpertBank;
using moe::model::ExpertCache;

using moe::test::grad_error;
using moe::test::randomize;
using moe::test::to_double;

namespace {

// L = sum(C * y) in double, with y from x, W1 [E_l][d*f1], W2 [E_l][f*d].
struct Reference {
  int64_t d, f;
  Activation act;
  std::vector<int64_t> offsets;
  std::vector<double> c;  // [R, d]

  void forward(const std::vector<double>& x, const std::vector<std::vector<double>>& w1,
               const std::vector<std::vector<double>>& w2, std::vector<double>& y) const {
    const int64_t f1 = act == Activation::kGelu ? f : 2 * f;
    y.assign(offsets.back() * d, 0.0);
    for (size_t e = 0; e + 1 < offsets.size(); ++e)
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        std::vector<double> h(f1, 0.0), a(f);
        for (int64_t j = 0; j < f1; ++j)
          for (int64_t p = 0; p < d; ++p) h[j] += x[r * d + p] * w1[e][p * f1 + j];
        for (int64_t j = 0; j < f; ++j) {
          if (act == Activation::kGelu) {
            a[j] = 0.5 * h[j] * (1.0 + std::erf(h[j] / std::sqrt(2.0)));
          } else {
            a[j] = h[j] / (1.0 + std::exp(-h[j])) * h[f + j];
          }
        }
        for (int64_t q = 0; q < d; ++q)
          for (int64_t j = 0; j < f; ++j) y[r * d + q] += a[j] * w2[e][j * d + q];
      }
  }
  double loss(const std::vector<double>& x, const std::vector<std::vector<double>>& w1,
              const std::vector<std::vector<double>>& w2) const {
    std::vector<double> y;
    forward(x, w1, w2, y);
    double l = 0.0;
    for (size_t i = 0; i < y.size(); ++i) l += c[i] * y[i];
    return l;
  }
};

}  // namespace

class ExpertGrad : public testing::TestWithParam<Activation> {};

// Tolerance 1e-4 normwise: the fp32 backward's GEMMs have depth <= max(R_e, f, d) = 13 here
// (error ~1e-6 relative), erf/exp in fp32 ~1e-7; the double central difference (h = 1e-6) is
// exact to ~1e-9. A missing or wrong term is O(1e-1) or more.
TEST_P(ExpertGrad, MatchesFiniteDifferencesOfDoubleReference) {
  const Activation act = GetParam();
  const int64_t d = 7, f = 10;
  const std::vector<int64_t> offsets = {0, 5, 5, 13};  // expert 1 receives nothing
  const int64_t R = offsets.back();
  ExpertBank bank(d, f, act, {3, 4, 9}, 17);
  Tensor x({R, d}), y({R, d}), c({R, d}), dx({R, d});
  randomize(x.view(), 1, 1.5f);
  randomize(c.view(), 2);
  ExpertCache cache;
  bank.forward(x.view(), offsets, y.view(), cache);

  Reference ref{d, f, act, offsets, to_double(c.view())};
  std::vector<double> xd = to_double(x.view());
  std::vector<std::vector<double>> w1, w2;
  for (int e = 0; e < 3; ++e)
    w1.push_back(to_double(bank.w1(e))), w2.push_back(to_double(bank.w2(e)));
  std::vector<double> yref;
  ref.forward(xd, w1, w2, yref);
  EXPECT_LT(grad_error(y.view(), yref), 1e-5);

  Tensor xcopy = x.clone();
  bank.backward(c.view(), dx.view(), cache);
  const double h = 1e-6;
  auto fd = [&](std::vector<double>& v) {
    std::vector<double> g(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const double old = v[i];
      v[i] = old + h;
      double lp = ref.loss(xd, w1, w2);
      v[i] = old - h;
      double lm = ref.loss(xd, w1, w2);
      v[i] = old;
      g[i] = (lp - lm) / (2 * h);
    }
    return g;
  };
  EXPECT_LT(grad_error(dx.view(), fd(xd)), 1e-4);
  for (int e = 0; e < 3; ++e) {
    EXPECT_LT(grad_error(bank.dw1(e), fd(w1[e])), 1e-4) << "expert slot " << e;
    EXPECT_LT(grad_error(bank.dw2(e), fd(w2[e])), 1e-4) << "expert slot " << e;
  }
  // The empty expert has zero gradient.
  for (int64_t i = 0; i < bank.dw1(1).size(); ++i) EXPECT_EQ(bank.dw1(1).data[i], 0.0f);
}

INSTANTIATE_TEST_SUITE_P(Activations, ExpertGrad,
                         testing::Values(Activation::kGelu, Activation::kSwiglu));

TEST(ExpertBank, WeightsDependOnGlobalIdOnly) {
  ExpertBank a(8, 16, Activation::kGelu, {0, 1, 2, 3}, 99);
  ExpertBank b(8, 16, Activation::kGelu, {2, 3}, 99);
  EXPECT_EQ(moe::max_rel_error(a.w1(2), b.w1(0)), 0.0);
  EXPECT_EQ(moe::max_rel_error(a.w2(3), b.w2(1)), 0.0);
  EXPECT_GT(moe::max_rel_error(a.w1(0), b.w1(0)), 0.1);
}

// Uneven experts large enough to be split into row and column blocks: 1 and 2 threads agree
// (blocks change only GEMM sizes, not which rows meet which weights), and backward accumulates.
TEST(ExpertBank, ThreadCountAndBlockingDoNotChangeResults) {
  for (Activation act : {Activation::kGelu, Activation::kSwiglu}) {
    const int64_t d = 32, f = 256;
    const std::vector<int64_t> offsets = {0, 700, 700, 760, 1000};
    const int64_t R = offsets.back();
    Tensor x({R, d}), dy({R, d});
    randomize(x.view(), 3);
    randomize(dy.view(), 4);
    Tensor y[2], dx[2], dw1[2], dw2[2];
    const int saved = omp_get_max_threads();
    for (int run = 0; run < 2; ++run) {
      omp_set_num_threads(run == 0 ? 1 : 2);
      ExpertBank bank(d, f, act, {0, 1, 2, 3}, 5);
      ExpertCache cache;
      y[run] = Tensor({R, d});
      dx[run] = Tensor({R, d});
      Tensor xin = x.clone();
      bank.forward(xin.view(), offsets, y[run].view(), cache);
      bank.backward(dy.view(), xin.view(), cache);  // dx over the input: allowed
      dx[run] = std::move(xin);
      // A second step accumulates into the gradients.
      Tensor xin2 = x.clone(), y2({R, d});
      bank.forward(xin2.view(), offsets, y2.view(), cache);
      bank.backward(dy.view(), xin2.view(), cache);
      dw1[run] = Tensor({4, d, act == Activation::kGelu ? f : 2 * f});
      dw2[run] = Tensor({4, f, d});
      for (int e = 0; e < 4; ++e) {
        moe::copy(bank.dw1(e), dw1[run].slab(e));
        moe::copy(bank.dw2(e), dw2[run].slab(e));
      }
      // Compare with a single step's gradient x 2 on the hot expert.
      ExpertBank once(d, f, act, {0, 1, 2, 3}, 5);
      Tensor xin3 = x.clone(), y3({R, d});
      once.forward(xin3.view(), offsets, y3.view(), cache);
      once.backward(dy.view(), xin3.view(), cache);
      for (int64_t i = 0; i < once.dw2(0).size(); ++i)
        ASSERT_NEAR(bank.dw2(0).data[i], 2 * once.dw2(0).data[i],
                    1e-5 * (1 + std::abs(once.dw2(0).data[i])));
    }
    omp_set_num_threads(saved);
    EXPECT_LT(moe::max_rel_error(y[1].view(), y[0].view()), 1e-6);
    EXPECT_LT(moe::max_rel_error(dx[1].view(), dx[0].view()), 1e-6);
    EXPECT_LT(moe::max_rel_error(dw1[1].view(), dw1[0].view()), 1e-6);
    EXPECT_LT(moe::max_rel_error(dw2[1].view(), dw2[0].view()), 1e-6);
  }
}
