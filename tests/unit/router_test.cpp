// TopKRouter: forward against a double-precision reference, backward (weights path, load-balancing
// loss over the batch or per sequence, and z-loss) against central finite differences of that
// reference, top-k ties and renormalisation on/off; the topk_bias selection and bias update; the
// expert-choice router's capacity, weights and backward. Single process: a null communicator makes
// this rank the whole batch.
#include "model/routers/expert_choice.hpp"
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
using moe::model::ExpertChoiceOptions;
using moe::model::ExpertChoiceRouter;
using moe::model::RouteResult;
using moe::model::TopKOptions;
using moe::model::TopKRouter;

using moe::test::grad_error;
using moe::test::randomize;
using moe::test::to_double;

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
  std::vector<int64_t> seq;  // sequence offsets [n_seq + 1] (sequence scope), or empty

  // E sum_i f_i P_i over rows [r0, r1), given the rows' probabilities.
  double balance(const std::vector<double>& probs, int64_t r0, int64_t r1) const {
    std::vector<double> count(E, 0.0), psum(E, 0.0);
    for (int64_t t = r0; t < r1; ++t)
      for (int j = 0; j < k; ++j) count[ids[t * k + j]] += 1.0;
    for (int64_t t = r0; t < r1; ++t)
      for (int i = 0; i < E; ++i) psum[i] += probs[t * E + i];
    const double n = double(r1 - r0);
    double lb = 0.0;
    for (int i = 0; i < E; ++i) lb += count[i] / (n * k) * psum[i] / n;
    return E * lb;
  }

  double loss(const std::vector<double>& x, const std::vector<double>& w,
              std::vector<double>* weights = nullptr, double* lb_out = nullptr,
              double* z_out = nullptr) const {
    std::vector<double> probs;
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
      for (int i = 0; i < E; ++i) p[i] = std::exp(l[i] - lse), probs.push_back(p[i]);
      double sel = 0.0;
      for (int j = 0; j < k; ++j) sel += p[ids[t * k + j]];
      for (int j = 0; j < k; ++j) {
        double wt = p[ids[t * k + j]] / (renorm ? sel : 1.0);
        if (weights) weights->push_back(wt);
        main += c[t * k + j] * wt;
      }
    }
    double lb = 0.0;
    if (seq.empty()) {
      lb = balance(probs, 0, T);
    } else {  // mean over the non-empty sequences
      double n_seq = 0.0;
      for (size_t b = 0; b + 1 < seq.size(); ++b)
        if (seq[b + 1] > seq[b]) lb += balance(probs, seq[b], seq[b + 1]), n_seq += 1.0;
      lb /= n_seq;
    }
    const double z = zsum / double(T);
    if (lb_out) *lb_out = lb;
    if (z_out) *z_out = z;
    return main + s * (a * lb + b * z);
  }
};

}  // namespace

class RouterGrad : public testing::TestWithParam<std::tuple<int, bool>> {};

// fp32 forward/backward vs the double reference. Tolerance: the analytic gradient is computed
// in fp32 (softmax, one GEMM of depth E or T), so its normwise error is a few hundred ulps at
// most (~1e-5); the double central difference with h = 1e-6 is accurate to ~1e-9. 1e-4 leaves
// a 10x margin and still catches any missing term (the smallest term here is ~1e-2 of the norm).
namespace {

// seq empty: the global-batch load-balancing loss; else the sequence scope over these offsets.
void check_router_grad(int k, bool renorm, const std::vector<int64_t>& seq) {
  const int64_t T = seq.empty() ? 9 : seq.back(), d = 6;
  const int E = 5;
  TopKOptions opt{E, k, renorm, 0.3, 0.2};
  opt.sequence_balance = !seq.empty();
  TopKRouter router(d, opt, nullptr, 42);
  router.set_sequences(seq);
  randomize(router.w().view(), 7, 0.8f);
  Tensor x({T, d});
  randomize(x.view(), 11);
  RouteResult r;
  router.forward(x.view(), r);

  Reference ref{T, d, E, k, renorm, opt.aux_loss_coef, opt.z_loss_coef, 0.7, r.expert, {}, seq};
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

}  // namespace

TEST_P(RouterGrad, MatchesFiniteDifferencesOfDoubleReference) {
  auto [k, renorm] = GetParam();
  check_router_grad(k, renorm, {});
}

// Sequence scope (the UMoE attention router): sequences of unequal length, one of them empty.
TEST_P(RouterGrad, SequenceScopeMatchesFiniteDifferences) {
  auto [k, renorm] = GetParam();
  check_router_grad(k, renorm, {0, 5, 5, 9, 12});
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

TEST(TopKBias, SelectsByScorePlusBiasButWeightsByScore) {
  const int64_t T = 6, d = 4;
  const int E = 4;
  TopKOptions o{E, 2, true, 0.5, 0.0};
  o.bias_balance = true;
  TopKRouter biased(d, o, nullptr, 3);
  Tensor x({T, d});
  randomize(x.view(), 4);
  biased.bias()[3] = 10.0f;  // expert 3 wins every token's first slot
  RouteResult a;
  biased.forward(x.view(), a);
  EXPECT_GT(a.load_balance_loss, 0.0);  // reported ...
  EXPECT_EQ(a.aux_loss, 0.0);           // ... but not in the loss (z_loss_coef 0 here)
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(a.expert[t * 2], 3);
    // Renormalised softmax weights of the two selected experts (no bias in them).
    const int e1 = a.expert[t * 2 + 1];
    double p3 = 0, p1 = 0;  // the softmax probabilities, from a top-E router of the same seed
    TopKRouter all(d, TopKOptions{E, E, false, 0.0, 0.0}, nullptr, 3);
    RouteResult r;
    all.forward(x.view().row_range(t, 1), r);
    for (int j = 0; j < E; ++j) {
      if (r.expert[j] == 3) p3 = r.weight[j];
      if (r.expert[j] == e1) p1 = r.weight[j];
    }
    EXPECT_NEAR(a.weight[t * 2], p3 / (p3 + p1), 1e-6);
    EXPECT_NEAR(a.weight[t * 2 + 1], p1 / (p3 + p1), 1e-6);
  }
}

TEST(TopKBias, UpdateMovesTowardTheMeanLoad) {
  // A hand-built imbalance: every token prefers expert 0 (then 1), k = 1, E = 4. After one
  // training micro-step (forward + backward) the update lowers b_0 (load T > mean T / 4) and
  // raises the others (load 0 < mean); a skipped step changes nothing.
  const int64_t T = 8, d = 4;
  const int E = 4;
  TopKOptions o{E, 1, false, 0.0, 0.0};
  o.bias_balance = true;
  o.bias_update_rate = 0.25;
  TopKRouter r(d, o, nullptr, 1);
  View w = r.w().view();
  w.fill(0.0f);
  for (int64_t p = 0; p < d; ++p) w(p, 0) = 1.0f, w(p, 1) = 0.5f;
  Tensor x({T, d}), dweight({T, 1}), dx({T, d});
  x.fill(1.0f);
  RouteResult res;
  r.forward(x.view(), res);
  EXPECT_EQ(res.expert_slots, (std::vector<int64_t>{T, 0, 0, 0}));
  r.end_step(true);  // no backward yet: no training load, no change
  for (int e = 0; e < E; ++e) EXPECT_EQ(r.bias()[e], 0.0f);
  r.backward(dweight.view(), 1.0f, dx.view());
  EXPECT_EQ(r.pending_load(), (std::vector<double>{double(T), 0, 0, 0}));
  r.end_step(false);  // skipped step: load discarded, bias unchanged
  for (int e = 0; e < E; ++e) EXPECT_EQ(r.bias()[e], 0.0f);
  r.forward(x.view(), res);
  r.backward(dweight.view(), 1.0f, dx.view());
  r.end_step(true);
  EXPECT_FLOAT_EQ(r.bias()[0], -0.25f);
  for (int e = 1; e < E; ++e) EXPECT_FLOAT_EQ(r.bias()[e], 0.25f) << e;
  EXPECT_EQ(r.pending_load(), (std::vector<double>(E, 0.0)));
  // p = softmax(4, 2, 0, 0) = (0.853, 0.116, 0.016, 0.016): with b = (-0.25, 0.25, 0.25, 0.25)
  // expert 0 still wins (0.60 > 0.37); one more update makes expert 1 the choice of every token
  // (0.35 < 0.62).
  r.forward(x.view(), res);
  EXPECT_EQ(res.expert_slots, (std::vector<int64_t>{T, 0, 0, 0}));
  r.backward(dweight.view(), 1.0f, dx.view());
  r.end_step(true);
  EXPECT_FLOAT_EQ(r.bias()[0], -0.5f);
  r.forward(x.view(), res);
  EXPECT_EQ(res.expert_slots, (std::vector<int64_t>{0, T, 0, 0}));
  EXPECT_EQ(r.buffers().size(), 1u);
  EXPECT_EQ(r.buffers()[0].first, "router.bias");
}

namespace {

// L = sum over chosen (t, e) of C[t, e] * softmax(x W)[t, e], for a FIXED choice, in double.
double expert_choice_loss(const std::vector<double>& x, const std::vector<double>& w, int64_t T,
                          int64_t d, int E, const std::vector<uint8_t>& chosen,
                          const std::vector<double>& C) {
  double L = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> l(E, 0.0);
    for (int i = 0; i < E; ++i)
      for (int64_t p = 0; p < d; ++p) l[i] += x[t * d + p] * w[p * E + i];
    double m = *std::max_element(l.begin(), l.end()), sum = 0.0;
    for (int i = 0; i < E; ++i) sum += std::exp(l[i] - m);
    for (int i = 0; i < E; ++i)
      if (chosen[t * E + i]) L += C[t * E + i] * std::exp(l[i] - m) / sum;
  }
  return L;
}

}  // namespace

TEST(ExpertChoice, EachExpertTakesItsTopCTokensAndBackwardMatchesFiniteDifferences) {
  const int64_t T = 11, d = 5;
  const int E = 4;
  ExpertChoiceRouter router(d, ExpertChoiceOptions{E, 1.5}, nullptr, 8);
  randomize(router.w().view(), 3, 0.9f);
  Tensor x({T, d});
  randomize(x.view(), 12);
  RouteResult r;
  router.forward(x.view(), r);
  const int64_t c = 5;  // ceil(11 * 1.5 / 4)
  EXPECT_EQ(router.capacity(), c);
  EXPECT_EQ(r.aux_loss, 0.0);

  // Chosen (t, e) from the result; each expert has exactly c tokens, and they are its top c.
  std::vector<uint8_t> chosen(T * E, 0);
  Tensor probs_t({T, E});
  View probs = probs_t.view();
  {
    TopKRouter all(d, TopKOptions{E, E, false, 0.0, 0.0}, nullptr, 8);
    moe::copy(router.w().view(), all.w().view());
    RouteResult a;
    all.forward(x.view(), a);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < E; ++j) probs(t, a.expert[t * E + j]) = a.weight[t * E + j];
  }
  for (int64_t t = 0; t < T; ++t) {
    int prev = -1;
    for (int j = 0; j < r.k; ++j) {
      const int e = r.expert[t * r.k + j];
      if (e < 0) continue;
      EXPECT_GT(e, prev) << "slots in increasing expert id";
      prev = e;
      chosen[t * E + e] = 1;
      EXPECT_FLOAT_EQ(r.weight[t * r.k + j], probs(t, e));
    }
  }
  for (int e = 0; e < E; ++e) {
    int64_t n = 0;
    float min_in = 2.0f, max_out = -1.0f;
    for (int64_t t = 0; t < T; ++t) {
      n += chosen[t * E + e];
      if (chosen[t * E + e])
        min_in = std::min(min_in, probs(t, e));
      else
        max_out = std::max(max_out, probs(t, e));
    }
    EXPECT_EQ(n, c) << "expert " << e;
    EXPECT_GT(min_in, max_out) << "expert " << e;
  }

  // Backward against central differences of the double reference (selection fixed). Tolerance
  // as in RouterGrad: fp32 analytic vs a double difference quotient, 1e-4 normwise.
  std::vector<double> C(T * E);
  Tensor dweight_t({T, r.k});
  View dweight = dweight_t.view();
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(-1, 1);
  for (double& v : C) v = u(rng);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < r.k; ++j) {
      const int e = r.expert[t * r.k + j];
      dweight(t, j) = e >= 0 ? static_cast<float>(C[t * E + e]) : 0.0f;
    }
  Tensor dx({T, d});
  router.backward(dweight, 1.0f, dx.view());
  std::vector<double> xd = to_double(x.view()), wd = to_double(router.w().view());
  const double h = 1e-6;
  auto fd = [&](std::vector<double>& v) {
    std::vector<double> g(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const double old = v[i];
      v[i] = old + h;
      const double lp = expert_choice_loss(xd, wd, T, d, E, chosen, C);
      v[i] = old - h;
      const double lm = expert_choice_loss(xd, wd, T, d, E, chosen, C);
      v[i] = old;
      g[i] = (lp - lm) / (2 * h);
    }
    return g;
  };
  EXPECT_LT(grad_error(dx.view(), fd(xd)), 1e-4);
  EXPECT_LT(grad_error(router.dw().view(), fd(wd)), 1e-4);
}

TEST(ExpertChoice, CapacityClampsToTheBatch) {
  // C = 8 experts per token with E = 4: c = min(N, 2N) = N, every token gets every expert.
  ExpertChoiceRouter router(3, ExpertChoiceOptions{4, 8.0}, nullptr, 1);
  Tensor x({5, 3});
  randomize(x.view(), 2);
  RouteResult r;
  router.forward(x.view(), r);
  EXPECT_EQ(router.capacity(), 5);
  EXPECT_EQ(r.k, 4);
  for (int32_t e : r.expert) EXPECT_GE(e, 0);
  EXPECT_THROW(ExpertChoiceRouter(3, ExpertChoiceOptions{4, 0.0}, nullptr, 1), moe::Error);
}
