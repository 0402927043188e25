// Dense Transformer layers (embedding, RMSNorm, attention with RoPE, FFN, LM head with
// cross-entropy): every input and parameter gradient against central finite differences,
// causality, RoPE's relative-position property, tied vs untied LM head, bad token ids, softmax
// stability with huge logits, and thread-count independence.
//
// Finite differences: the layers run in fp32, the scalar loss L = sum(C * y) (C fixed random)
// is summed in double, and dL/dp ~ (L(p + h) - L(p - h)) / 2h with h = 1e-2 (inputs and
// weights are O(0.1..1)). Error budget: L sums ~100 fp32 outputs with relative rounding 6e-8
// each, so its noise is ~1e-6 and ~5e-5 after dividing by 2h; the truncation error
// h^2 |f'''| / 6 is ~2e-5. Against gradients of size O(0.1..1) that is a normwise relative
// error (max |a - fd| / max |fd|) of ~1e-4; the tests require 1e-3 (observed: 2e-6..8e-5).
// A wrong term in a backward gives errors of order 0.1..1 (dropping RoPE's transpose on dk
// gives 0.14..0.25).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "model/layers/attention.hpp"
#include "model/layers/embedding.hpp"
#include "model/layers/ffn.hpp"
#include "model/layers/lm_head.hpp"
#include "model/layers/rms_norm.hpp"
#include "runtime/error.hpp"
#include "tests/test_util.hpp"

using moe::ConstView;
using moe::Error;
using moe::Tensor;
using moe::View;
using namespace moe::model;

using moe::test::randomize;

namespace {

constexpr double kStep = 1e-2;
constexpr double kTol = 1e-3;

double dot(ConstView a, ConstView b) {
  double s = 0.0;
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) s += double(a(i, j)) * double(b(i, j));
  return s;
}

// Normwise relative error of the analytic gradient at up to max_probes entries of p (spread
// over the whole tensor), against central differences of loss().
double fd_error(View p, ConstView analytic, const std::function<double()>& loss,
                int64_t max_probes = 48) {
  const int64_t n = p.rows * p.cols;
  const int64_t stride = std::max<int64_t>(1, n / max_probes);
  double num = 0.0, den = 1e-12;
  for (int64_t e = 0; e < n; e += stride) {
    const int64_t i = e / p.cols, j = e % p.cols;
    const float saved = p(i, j);
    p(i, j) = saved + float(kStep);
    const double lp = loss();
    p(i, j) = saved - float(kStep);
    const double lm = loss();
    p(i, j) = saved;
    const double fd = (lp - lm) / (2.0 * kStep);
    num = std::max(num, std::abs(double(analytic(i, j)) - fd));
    den = std::max(den, std::abs(fd));
  }
  return num / den;
}

bool all_finite(ConstView v) {
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j)
      if (!std::isfinite(v(i, j))) return false;
  return true;
}

}  // namespace

// ---- embedding ---------------------------------------------------------------------------

TEST(Embedding, GathersRowsAndScatterAddsWithRepeatedIds) {
  const int64_t V = 7, d = 40;
  Embedding emb("emb", V, d, 1);
  const std::vector<int32_t> ids = {3, 0, 3, 6, 3, 1};
  const int64_t n = static_cast<int64_t>(ids.size());
  Tensor y({n, d}), dy({n, d});
  emb.forward(ids, y.view());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) EXPECT_EQ(y.view()(i, j), emb.weight()(ids[i], j));
  randomize(dy.view(), 2);
  emb.zero_grad();
  emb.backward(dy.view());
  emb.backward(dy.view());  // accumulates
  std::vector<double> expect(V * d, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) expect[ids[i] * d + j] += 2.0 * dy.view()(i, j);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t j = 0; j < d; ++j) EXPECT_NEAR(emb.grad()(v, j), expect[v * d + j], 1e-5);
}

TEST(Embedding, OutOfRangeIdNamesIdAndVocab) {
  Embedding emb("emb", 10, 4, 1);
  Tensor y({3, 4});
  const std::vector<int32_t> bad = {1, 10, 2};
  try {
    emb.forward(bad, y.view());
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("token id 10"), std::string::npos) << m;
    EXPECT_NE(m.find("[0, 10)"), std::string::npos) << m;
  }
  const std::vector<int32_t> neg = {-1, 0, 0};
  EXPECT_THROW(emb.forward(neg, y.view()), Error);
}

// ---- rms norm ----------------------------------------------------------------------------

TEST(RmsNorm, GradientsMatchFiniteDifferences) {
  const int64_t n = 6, d = 24;
  RmsNorm norm("norm", d, 1e-5f);
  randomize(norm.gain(), 3);
  Tensor x({n, d}), y({n, d}), c({n, d}), dx({n, d});
  randomize(x.view(), 4);
  randomize(c.view(), 5);
  auto loss = [&] {
    norm.forward(x.view(), y.view());
    return dot(y.view(), c.view());
  };
  loss();
  norm.zero_grad();
  norm.backward(c.view(), dx.view());
  EXPECT_LT(fd_error(x.view(), dx.view(), loss), kTol);
  EXPECT_LT(fd_error(norm.gain(), norm.gain_grad(), loss), kTol);
  // Output rows have unit RMS when the gain is 1.
  RmsNorm unit("unit", d, 0.0f);
  unit.forward(x.view(), y.view());
  double ss = 0.0;
  for (int64_t j = 0; j < d; ++j) ss += double(y.view()(2, j)) * y.view()(2, j);
  EXPECT_NEAR(ss / d, 1.0, 1e-5);
}

// ---- ffn ---------------------------------------------------------------------------------

class FfnTest : public ::testing::TestWithParam<Activation> {};

TEST_P(FfnTest, GradientsMatchFiniteDifferences) {
  const int64_t n = 5, d = 12, f = 20;
  Ffn ffn("ffn", d, f, GetParam(), 7);
  Tensor x({n, d}), y({n, d}), c({n, d}), dx({n, d});
  randomize(x.view(), 8);
  randomize(c.view(), 9);
  auto loss = [&] {
    ffn.forward(x.view(), y.view());
    return dot(y.view(), c.view());
  };
  loss();
  ffn.zero_grad();
  ffn.backward(c.view(), dx.view());
  const std::vector<ParamRef> ps = ffn.params();
  ASSERT_EQ(ps.size(), 2u);
  EXPECT_LT(fd_error(x.view(), dx.view(), loss), kTol);
  for (const ParamRef& p : ps) EXPECT_LT(fd_error(p.value, p.grad, loss), kTol) << p.name;
}

INSTANTIATE_TEST_SUITE_P(Activations, FfnTest,
                         ::testing::Values(Activation::kGelu, Activation::kSwiglu));

// ---- attention ---------------------------------------------------------------------------

class AttentionGrad : public ::testing::TestWithParam<bool> {};

TEST_P(AttentionGrad, GradientsMatchFiniteDifferences) {
  const int64_t B = 2, T = 5, d = 8, N = B * T;
  AttentionConfig cfg;
  cfg.n_heads = 2;
  cfg.bias = GetParam();
  cfg.query_tile = 2;  // three causal tiles of 2, 2 and 1 query rows
  Attention attn("attn", d, cfg, 11);
  Tensor x({N, d}), y({N, d}), c({N, d}), dx({N, d});
  randomize(x.view(), 12);
  randomize(c.view(), 13);
  // Larger weights than the default init, so the probabilities are far from uniform.
  for (ParamRef& p : attn.params())
    randomize(p.value, 14 + static_cast<uint32_t>(p.value.cols), 0.5f);
  auto loss = [&] {
    attn.forward(x.view(), B, y.view(), 3);
    return dot(y.view(), c.view());
  };
  loss();
  attn.zero_grad();
  attn.backward(c.view(), dx.view());
  EXPECT_LT(fd_error(x.view(), dx.view(), loss, 80), kTol);
  const std::vector<ParamRef> ps = attn.params();
  ASSERT_EQ(ps.size(), GetParam() ? 4u : 2u);
  for (const ParamRef& p : ps) EXPECT_LT(fd_error(p.value, p.grad, loss, 80), kTol) << p.name;
}

INSTANTIATE_TEST_SUITE_P(Bias, AttentionGrad, ::testing::Values(false, true));

TEST(Attention, IsCausalAndSequencesAreIndependent) {
  const int64_t B = 2, T = 6, d = 16, N = B * T;
  AttentionConfig cfg;
  cfg.n_heads = 4;
  Attention attn("attn", d, cfg, 21);
  Tensor x({N, d}), y0({N, d}), y1({N, d});
  randomize(x.view(), 22);
  attn.forward(x.view(), B, y0.view());
  // Probabilities: rows sum to 1, zero above the diagonal.
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < cfg.n_heads; ++h) {
      const Tensor pt = attn.probs(b, h);
      ConstView p = pt.view();
      for (int64_t t = 0; t < T; ++t) {
        double s = 0.0;
        for (int64_t j = 0; j < T; ++j) {
          s += p(t, j);
          if (j > t) {
            EXPECT_EQ(p(t, j), 0.0f);
          }
        }
        EXPECT_NEAR(s, 1.0, 1e-5);
      }
    }
  for (int64_t t = 0; t + 1 < T; ++t) {
    Tensor x2 = x.clone();
    for (int64_t j = 0; j < d; ++j) x2.view()(t + 1, j) += 1.0f;  // token t+1 of sequence 0
    attn.forward(x2.view(), B, y1.view());
    for (int64_t r = 0; r < N; ++r) {
      const bool may_change = r >= t + 1 && r < T;
      double diff = 0.0;
      for (int64_t j = 0; j < d; ++j)
        diff = std::max(diff, double(std::abs(y1.view()(r, j) - y0.view()(r, j))));
      if (may_change) {
        if (r == t + 1) {
          EXPECT_GT(diff, 1e-4) << "row " << r;
        }
      } else {
        EXPECT_LE(diff, 1e-6) << "changed token " << t + 1 << ", row " << r;
      }
    }
  }
}

TEST(Attention, QueryTileSizeDoesNotChangeResults) {
  // Causal tiles of any size compute the same function as one [T, T] tile, forward and
  // backward (up to float rounding: the sums over tiles are ordered differently).
  const int64_t B = 2, T = 37, d = 16, N = B * T;
  Tensor x({N, d}), dy({N, d});
  randomize(x.view(), 101);
  randomize(dy.view(), 102);
  Tensor y_ref({N, d}), dx_ref({N, d});
  std::vector<Tensor> g_ref;
  for (int64_t tile : {T, int64_t{1}, int64_t{5}, int64_t{16}, int64_t{64}}) {
    AttentionConfig cfg;
    cfg.n_heads = 2;
    cfg.query_tile = tile;
    Attention attn("attn", d, cfg, 103);
    for (ParamRef& p : attn.params()) randomize(p.value, 104, 0.5f);
    Tensor y({N, d}), dx({N, d});
    attn.forward(x.view(), B, y.view());
    const Tensor p = attn.probs(1, 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = t + 1; j < T; ++j) ASSERT_EQ(p.view()(t, j), 0.0f);
    attn.zero_grad();
    attn.backward(dy.view(), dx.view());
    if (tile == T) {
      y_ref = y.clone();
      dx_ref = dx.clone();
      for (ParamRef& q : attn.params()) {
        g_ref.emplace_back(std::initializer_list<int64_t>{q.grad.rows, q.grad.cols});
        moe::copy(q.grad, g_ref.back().view());
      }
      continue;
    }
    EXPECT_LT(moe::max_rel_error(y.view(), y_ref.view()), 1e-5) << "tile " << tile;
    EXPECT_LT(moe::max_rel_error(dx.view(), dx_ref.view()), 1e-5) << "tile " << tile;
    const std::vector<ParamRef> ps = attn.params();
    for (size_t i = 0; i < ps.size(); ++i)
      EXPECT_LT(moe::max_rel_error(ps[i].grad, g_ref[i].view()), 1e-5) << ps[i].name;
  }
}

TEST(Rope, ScoresDependOnlyOnRelativePosition) {
  const int64_t dh = 16;
  Rope rope(dh);
  Tensor q({1, dh}), k({1, dh});
  randomize(q.view(), 31);
  randomize(k.view(), 32);
  auto score = [&](int64_t m, int64_t n) {
    Tensor a({1, dh}), b({1, dh});
    moe::copy(q.view(), a.view());
    moe::copy(k.view(), b.view());
    rope.prepare(m, 1);
    rope.apply(a.view());
    rope.prepare(n, 1);
    rope.apply(b.view());
    return dot(a.view(), b.view());
  };
  const double s0 = score(3, 7);
  for (int64_t shift : {1, 10, 1000, 20000}) EXPECT_NEAR(score(3 + shift, 7 + shift), s0, 1e-4);
  EXPECT_GT(std::abs(score(3, 8) - s0), 1e-3);  // but the relative position matters
  // The transpose undoes the rotation.
  Tensor a = q.clone();
  rope.prepare(123, 1);
  rope.apply(a.view());
  rope.apply_transpose(a.view());
  EXPECT_LT(moe::max_rel_error(a.view(), q.view()), 1e-6);
}

TEST(Attention, ShiftingAllPositionsLeavesOutputUnchanged) {
  const int64_t B = 2, T = 7, d = 16, N = B * T;
  AttentionConfig cfg;
  cfg.n_heads = 2;
  Attention attn("attn", d, cfg, 41);
  for (ParamRef& p : attn.params()) randomize(p.value, 42, 0.5f);
  Tensor x({N, d}), y0({N, d}), y1({N, d}), q0({1, 1});
  randomize(x.view(), 43);
  attn.forward(x.view(), B, y0.view(), 0);
  const Tensor p0 = attn.probs(1, 1);
  attn.forward(x.view(), B, y1.view(), 517);
  EXPECT_LT(moe::max_rel_error(y1.view(), y0.view()), 1e-4);
  const Tensor p1 = attn.probs(1, 1);
  for (int64_t i = 0; i < T * T; ++i) EXPECT_NEAR(p1.data()[i], p0.data()[i], 1e-5);
}

TEST(Attention, HugeScoresStayFinite) {
  const int64_t B = 1, T = 8, d = 8, N = B * T;
  AttentionConfig cfg;
  cfg.n_heads = 2;
  Attention attn("attn", d, cfg, 51);
  Tensor x({N, d}), y({N, d}), dx({N, d});
  randomize(x.view(), 52, 1000.0f);  // scores ~1e5: exp would overflow without the max
  attn.forward(x.view(), B, y.view());
  EXPECT_TRUE(all_finite(y.view()));
  attn.backward(y.view(), dx.view());
  EXPECT_TRUE(all_finite(dx.view()));
}

TEST(Attention, BackwardDoesNotDependOnThreadCount) {
  const int64_t B = 3, T = 9, d = 16, N = B * T;
  AttentionConfig cfg;
  cfg.n_heads = 4;
  Tensor x({N, d}), y({N, d}), dy({N, d}), dx1({N, d}), dx2({N, d});
  randomize(x.view(), 61);
  randomize(dy.view(), 62);
  Attention a1("attn", d, cfg, 63), a2("attn", d, cfg, 63);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  a1.forward(x.view(), B, y.view());
  a1.backward(dy.view(), dx1.view());
  omp_set_num_threads(2);
  a2.forward(x.view(), B, y.view());
  a2.backward(dy.view(), dx2.view());
  omp_set_num_threads(saved);
  EXPECT_LT(moe::max_rel_error(dx2.view(), dx1.view()), 1e-6);
  EXPECT_LT(moe::max_rel_error(a2.params()[0].grad, a1.params()[0].grad), 1e-6);
}

// ---- lm head and cross-entropy -----------------------------------------------------------

TEST(LmHead, UntiedGradientsMatchFiniteDifferences) {
  const int64_t N = 6, d = 10, V = 13;
  LmHead head("head", V, d, 71);
  randomize(head.weight(), 72, 0.5f);
  Tensor x({N, d}), dx({N, d});
  randomize(x.view(), 73);
  const std::vector<int32_t> tgt = {0, 12, 5, -1, 5, 7};  // one ignored
  const double norm = 20.0;  // e.g. the global token count over all ranks
  auto loss = [&] { return head.forward(x.view(), tgt, norm); };
  loss();
  head.zero_grad();
  head.backward(dx.view());
  EXPECT_LT(fd_error(x.view(), dx.view(), loss), kTol);
  EXPECT_LT(fd_error(head.weight(), head.grad(), loss, 130), kTol);
  for (int64_t j = 0; j < d; ++j) EXPECT_EQ(dx.view()(3, j), 0.0f);  // ignored target
}

TEST(LmHead, TiedGradientIsSumOfBothUses) {
  const int64_t N = 7, d = 8, V = 11;
  const std::vector<int32_t> ids = {1, 4, 4, 9, 0, 10, 4};
  const std::vector<int32_t> tgt = {4, 4, 9, 0, 10, 4, 2};
  const double norm = double(N);
  // Tied: emb -> (x * 3, so the model is not symmetric in the two uses) -> head.
  Embedding emb("emb", V, d, 81);
  randomize(emb.weight(), 82, 0.5f);
  LmHead tied("head", emb);
  EXPECT_TRUE(tied.params().empty());
  Tensor x({N, d}), dx({N, d});
  auto loss = [&] {
    emb.forward(ids, x.view());
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < d; ++j) x.view()(i, j) *= 3.0f;
    return tied.forward(x.view(), tgt, norm);
  };
  const double l_tied = loss();
  emb.grad().fill(0.25f);  // an earlier micro-batch's gradient: both uses must add to it
  tied.backward(dx.view());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) dx.view()(i, j) *= 3.0f;
  emb.backward(dx.view());
  for (int64_t v = 0; v < V; ++v)
    for (int64_t j = 0; j < d; ++j) emb.grad()(v, j) -= 0.25f;
  EXPECT_LT(fd_error(emb.weight(), emb.grad(), loss, 88), kTol);

  // Untied with the same table copied into its own weight: the tied gradient is the sum.
  Embedding emb2("emb", V, d, 81);
  moe::copy(emb.weight(), emb2.weight());
  LmHead untied("head", V, d, 83);
  moe::copy(emb.weight(), untied.weight());
  Tensor x2({N, d}), dx2({N, d});
  emb2.forward(ids, x2.view());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) x2.view()(i, j) *= 3.0f;
  EXPECT_NEAR(untied.forward(x2.view(), tgt, norm), l_tied, 1e-6);
  emb2.zero_grad();
  untied.zero_grad();
  untied.backward(dx2.view());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < d; ++j) dx2.view()(i, j) *= 3.0f;
  emb2.backward(dx2.view());
  Tensor sum({V, d});
  for (int64_t v = 0; v < V; ++v)
    for (int64_t j = 0; j < d; ++j) sum.view()(v, j) = emb2.grad()(v, j) + untied.grad()(v, j);
  EXPECT_LT(moe::max_rel_error(emb.grad(), sum.view()), 1e-5);
  EXPECT_GT(moe::max_rel_error(emb2.grad(), sum.view()), 1e-2);  // both parts matter
}

TEST(CrossEntropy, HugeLogitsStayFinite) {
  const int64_t V = 5;
  Tensor logits({3, V});
  const float big[3][V] = {{1e30f, -1e30f, 0.0f, 3e38f, -3e38f},
                           {1e4f, 0.0f, 0.0f, 0.0f, 0.0f},
                           {88.0f, 89.0f, 90.0f, 1000.0f, 1000.0f}};
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < V; ++j) logits.view()(i, j) = big[i][j];
  std::vector<double> rows;
  const std::vector<int32_t> tgt = {3, 1, 4};
  const double loss = softmax_cross_entropy(logits.view(), tgt, 1.0, rows);
  ASSERT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(rows[0], 0.0, 1e-6);  // the target holds the largest logit
  EXPECT_NEAR(rows[1], 1e4, 1e-2);  // -log softmax = max - z_t
  EXPECT_NEAR(rows[2], std::log(2.0), 1e-6);
  EXPECT_TRUE(all_finite(logits.view()));
  for (int64_t i = 0; i < 3; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < V; ++j) s += logits.view()(i, j);
    EXPECT_NEAR(s, 0.0, 1e-6);  // softmax - onehot sums to zero
  }
}

TEST(CrossEntropy, NormaliserMakesShardedLossesAddUp) {
  const int64_t N = 8, V = 6;
  Tensor all({N, V});
  randomize(all.view(), 91, 3.0f);
  Tensor half0 = all.clone(), half1 = all.clone();
  std::vector<int32_t> tgt = {0, 1, 2, 3, 4, 5, 0, 1};
  std::vector<double> rows;
  const double l_all = softmax_cross_entropy(all.view(), tgt, double(N), rows);
  // Two "ranks", each with half the tokens, normalised by the global count.
  const std::span<const int32_t> t(tgt);
  const double l0 =
      softmax_cross_entropy(half0.view().row_range(0, N / 2), t.subspan(0, N / 2), double(N), rows);
  const double l1 = softmax_cross_entropy(half1.view().row_range(N / 2, N / 2),
                                          t.subspan(N / 2, N / 2), double(N), rows);
  EXPECT_NEAR(l0 + l1, l_all, 1e-9);
  EXPECT_LT(moe::max_rel_error(half0.view().row_range(0, N / 2), all.view().row_range(0, N / 2)),
            1e-7);
  std::vector<int32_t> bad = tgt;
  bad[2] = int32_t(V);
  EXPECT_THROW(softmax_cross_entropy(all.view(), bad, 1.0, rows), Error);
}
