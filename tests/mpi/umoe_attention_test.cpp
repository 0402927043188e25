// UmoeAttention: (1) forward against a plain double-precision reference written here from the
// layer's formulas, and the explicit backward against central finite differences of that
// reference (one rank, a self-communicator); (2) distributed == single rank on np = 1, 2, 4:
// output, dx, the replicated gradients summed over ranks and every expert's gradient within
// 1e-5 relative, with a rank that holds no sequence at np = 4; (3) sharing: an FFN MoeLayer
// over the attention's ExpertBank runs the same experts (an update from the attention path
// changes the FFN's output) and both backward passes accumulate into one set of gradients.
#include "model/layers/umoe_attention.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

using moe::ConstView;
using moe::Tensor;
using moe::View;
using moe::comm::Communicator;
using moe::comm::ExpertPlacement;
using moe::model::MoeConfig;
using moe::model::MoeLayer;
using moe::model::ParamRef;
using moe::model::UmoeAttention;
using moe::model::UmoeConfig;
using moe::test::randomize;

namespace {

constexpr double kTol = 1e-5;

MoeConfig moe_config() {
  MoeConfig m;
  m.n_experts = 4;
  m.top_k = 2;
  m.d_ff = 12;
  m.aux_loss_coef = 0.01;
  m.z_loss_coef = 0.0;
  m.exchange = moe::model::ExchangeMode::kAlltoallv;
  return m;
}

UmoeConfig umoe_config() {
  UmoeConfig u;
  u.top_k = 2;
  u.d_qk = 6;
  u.query_rank = 3;
  u.shared_experts = 1;
  u.aux_loss_coef = 0.0;
  return u;
}

std::map<std::string, View> by_name(std::vector<ParamRef> ps) {
  std::map<std::string, View> m;
  for (ParamRef& p : ps) m[p.name] = p.value;
  return m;
}

double gelu(double h) {
  return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0)));
}

// y = gelu(z W1) W2 in double.
std::vector<double> ffn(const std::vector<double>& z, ConstView w1, ConstView w2) {
  const int64_t d = w1.rows, f = w1.cols;
  std::vector<double> a(f, 0.0), y(d, 0.0);
  for (int64_t c = 0; c < f; ++c) {
    double h = 0;
    for (int64_t i = 0; i < d; ++i) h += z[i] * w1(i, c);
    a[c] = gelu(h);
  }
  for (int64_t o = 0; o < d; ++o)
    for (int64_t c = 0; c < f; ++c) y[o] += a[c] * w2(c, o);
  return y;
}

void rope(std::vector<double>& v, int64_t pos, double base) {
  const int64_t n = static_cast<int64_t>(v.size()), half = n / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double ang = pos * std::pow(base, -2.0 * i / n);
    const double a = v[i], b = v[i + half];
    v[i] = a * std::cos(ang) - b * std::sin(ang);
    v[i + half] = a * std::sin(ang) + b * std::cos(ang);
  }
}

// The reference: straight from the formulas in umoe_attention.hpp, every token and slot on its
// own, double accumulation. experts[t*k + j] fixes the routing (the layer's choice), so finite
// differences never cross a top-k boundary. Returns <dy, y> and writes y.
double reference(UmoeAttention& l, const MoeConfig& mc, ConstView x, int64_t n_seq,
                 const std::vector<int32_t>& experts, ConstView dy, Tensor* y_out) {
  const UmoeConfig& u = l.config();
  const int64_t T = x.rows, d = x.cols, S = T / n_seq, dqk = u.d_qk, r = u.query_rank;
  const int E = mc.n_experts, k = u.top_k, ns = u.shared_experts;
  std::map<std::string, View> p = by_name(l.replicated_params());
  ConstView wr = p["router.w"], wq = p["w_q"], wk = p["w_k"], wa = p["w_a"], wb = p["w_b"];
  auto proj = [&](int64_t t, ConstView w, int64_t c0, int64_t n) {
    std::vector<double> o(n, 0.0);
    for (int64_t c = 0; c < n; ++c)
      for (int64_t i = 0; i < d; ++i) o[c] += double(x(t, i)) * w(i, c0 + c);
    return o;
  };
  // keys
  std::vector<std::vector<double>> K(T);
  for (int64_t t = 0; t < T; ++t) {
    K[t] = proj(t, wk, 0, dqk);
    rope(K[t], t % S, u.rope_base);
  }
  // mixture for token t through query correction i
  auto mix = [&](int64_t t, int i) {
    std::vector<double> q = proj(t, wq, 0, dqk), ua = proj(t, wa, i * r, r);
    double ss = 0;
    for (double v : ua) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / r + u.norm_eps);
    for (int64_t c = 0; c < r; ++c)
      for (int64_t o = 0; o < dqk; ++o) q[o] += ua[c] * inv * wb(i * r + c, o);
    rope(q, t % S, u.rope_base);
    const int64_t b0 = t - t % S;
    std::vector<double> sc(t - b0 + 1);
    double mx = -1e300;
    for (int64_t s = b0; s <= t; ++s) {
      double v = 0;
      for (int64_t o = 0; o < dqk; ++o) v += q[o] * K[s][o];
      sc[s - b0] = v / std::sqrt(double(dqk));
      mx = std::max(mx, sc[s - b0]);
    }
    double sum = 0;
    for (double& v : sc) sum += (v = std::exp(v - mx));
    std::vector<double> z(d, 0.0);
    for (int64_t s = b0; s <= t; ++s)
      for (int64_t c = 0; c < d; ++c) z[c] += sc[s - b0] / sum * x(s, c);
    return z;
  };
  double L = 0;
  if (y_out) *y_out = Tensor({T, d});
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> logit = proj(t, wr, 0, E), y(d, 0.0);
    double mx = *std::max_element(logit.begin(), logit.end()), sum = 0;
    for (double& v : logit) sum += (v = std::exp(v - mx));
    for (int j = 0; j < k; ++j) {
      const int e = experts[t * k + j];
      const std::vector<double> o =
          ffn(mix(t, e), l.experts().w1(e), l.experts().w2(e));  // one rank: slot e = expert e
      for (int64_t c = 0; c < d; ++c) y[c] += logit[e] / sum * o[c];
    }
    for (int s = 0; s < ns; ++s) {
      const std::string n = "shared." + std::to_string(s) + ".";
      const std::vector<double> o = ffn(mix(t, E + s), p[n + "w1"], p[n + "w2"]);
      for (int64_t c = 0; c < d; ++c) y[c] += o[c];
    }
    for (int64_t c = 0; c < d; ++c) {
      L += y[c] * dy(t, c);
      if (y_out) y_out->data()[t * d + c] = static_cast<float>(y[c]);
    }
  }
  return L;
}

TEST(UmoeAttention, MatchesReferenceAndFiniteDifferences) {
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const MoeConfig mc = moe_config();
  const UmoeConfig uc = umoe_config();
  const int64_t n_seq = 2, S = 5, T = n_seq * S, d = 8;
  ExpertPlacement one = ExpertPlacement::blocked(mc.n_experts, 1);
  UmoeAttention l("umoe", d, uc, mc, one, self, 77);
  // Larger query corrections than the initialisation, so their gradients are not tiny.
  for (ParamRef& p : l.replicated_params())
    if (p.name == "w_b") randomize(p.value, 5, 0.5f);
  Tensor x({T, d}), dy({T, d}), y({T, d}), dx({T, d});
  randomize(x.view(), 11);
  randomize(dy.view(), 12);
  l.forward(x.view(), n_seq, y.view());
  const std::vector<int32_t> experts = l.route().expert;

  // The layer's own top-k agrees with the reference's softmax ranking (sorted, no ties here).
  Tensor y_ref;
  reference(l, mc, x.view(), n_seq, experts, dy.view(), &y_ref);
  EXPECT_LT(moe::max_rel_error(y.view(), y_ref.view()), 1e-5);

  l.zero_grad();
  l.backward(dy.view(), dx.view(), 1.0f);

  // Central differences of the reference, entry by entry, against the analytic gradient.
  auto check = [&](const std::string& what, View value, ConstView grad) {
    double worst = 0;
    const int64_t n = value.rows * value.cols, stride = std::max<int64_t>(1, n / 12);
    for (int64_t i = 0; i < n; i += stride) {
      float& w = value(i / value.cols, i % value.cols);
      const float w0 = w;
      const float h = 1e-3f * std::max(1.0f, std::fabs(w0));
      w = w0 + h;
      const float wp = w;
      const double lp = reference(l, mc, x.view(), n_seq, experts, dy.view(), nullptr);
      w = w0 - h;
      const float wm = w;
      const double lm = reference(l, mc, x.view(), n_seq, experts, dy.view(), nullptr);
      w = w0;
      const double fd = (lp - lm) / (double(wp) - double(wm));
      const double g = grad(i / value.cols, i % value.cols);
      worst = std::max(worst, std::fabs(fd - g) / std::max(1e-2, std::fabs(fd)));
    }
    EXPECT_LT(worst, 1e-4) << what;
  };
  check("x", x.view(), dx.view());
  for (ParamRef& p : l.params()) check(p.name, p.value, p.grad);
}

// The distributed layer on whole sequences of this rank against the single-rank reference.
void run_equivalence(int64_t n_seq, int64_t S) {
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const int P = world.size(), rank = world.rank();
  MoeConfig mc = moe_config();
  UmoeConfig uc = umoe_config();
  uc.aux_loss_coef = 1e-2;
  uc.shared_experts = 2;
  const int64_t T = n_seq * S, d = 8;
  SCOPED_TRACE("np=" + std::to_string(P) + " sequences " + std::to_string(n_seq));
  Tensor x({T, d}), dy({T, d});
  randomize(x.view(), 21);
  randomize(dy.view(), 22);

  ExpertPlacement one = ExpertPlacement::blocked(mc.n_experts, 1);
  UmoeAttention ref("umoe", d, uc, mc, one, self, 99);
  Tensor y_ref({T, d}), dx_ref({T, d});
  ref.forward(x.view(), n_seq, y_ref.view());
  ref.backward(dy.view(), dx_ref.view(), 0.5f);

  ExpertPlacement placement = ExpertPlacement::blocked(mc.n_experts, P);
  UmoeAttention layer("umoe", d, uc, mc, placement, world, 99);
  const int64_t b0 = n_seq * rank / P, nb = n_seq * (rank + 1) / P - b0;
  const int64_t t0 = b0 * S, nt = nb * S;
  Tensor y({nt, d}), dx({nt, d});
  ConstView xs = ConstView(x.view()).row_range(t0, nt);
  for (int step = 0; step < 2; ++step) {  // buffers reused; gradients accumulate (2x)
    layer.forward(xs, nb, y.view());
    layer.backward(ConstView(dy.view()).row_range(t0, nt), dx.view(), 0.5f);
  }
  EXPECT_LT(moe::max_rel_error(y.view(), ConstView(y_ref.view()).row_range(t0, nt)), kTol);
  EXPECT_LT(moe::max_rel_error(dx.view(), ConstView(dx_ref.view()).row_range(t0, nt)), kTol);
  EXPECT_NEAR(layer.aux_loss(), ref.aux_loss(), 1e-6 * (1 + ref.aux_loss()));

  std::vector<ParamRef> rep = layer.replicated_params(), rep_ref = ref.replicated_params();
  ASSERT_EQ(rep.size(), rep_ref.size());
  for (size_t i = 0; i < rep.size(); ++i) {
    EXPECT_EQ(moe::max_rel_error(rep[i].value, rep_ref[i].value), 0.0) << rep[i].name;
    Tensor g({rep[i].grad.rows, rep[i].grad.cols}), g_ref({rep[i].grad.rows, rep[i].grad.cols});
    moe::copy(rep[i].grad, g.view());
    moe::copy(rep_ref[i].grad, g_ref.view());
    world.allreduce_sum(g.data(), g.numel());
    for (int64_t j = 0; j < g_ref.numel(); ++j) g_ref[j] *= 2;
    EXPECT_LT(moe::max_rel_error(g.view(), g_ref.view(), 1e-3), kTol) << rep[i].name;
  }
  const std::vector<int>& ids = layer.experts().global_ids();
  for (int e = 0; e < static_cast<int>(ids.size()); ++e) {
    const int g = ids[e];
    EXPECT_EQ(moe::max_rel_error(layer.experts().w1(e), ref.experts().w1(g)), 0.0);
    for (int which = 0; which < 2; ++which) {
      ConstView got = which == 0 ? layer.experts().dw1(e) : layer.experts().dw2(e);
      ConstView want = which == 0 ? ref.experts().dw1(g) : ref.experts().dw2(g);
      Tensor w2({want.rows, want.cols});
      moe::copy(want, w2.view());
      for (int64_t j = 0; j < w2.numel(); ++j) w2[j] *= 2;
      EXPECT_LT(moe::max_rel_error(got, w2.view(), 1e-3), kTol) << "expert " << g << " " << which;
    }
  }
}

TEST(UmoeAttention, DistributedEqualsSingleRank) {
  run_equivalence(4, 6);
}

// np = 4 with three sequences: one rank has none and still joins every collective.
TEST(UmoeAttention, DistributedWithAnEmptyRank) {
  run_equivalence(3, 7);
}

TEST(UmoeAttention, FfnSharesTheExperts) {
  Communicator world = Communicator::world();
  const int P = world.size();
  const MoeConfig mc = moe_config();
  const UmoeConfig uc = umoe_config();
  const int64_t n_seq = 2, S = 6, T = n_seq * S, d = 8;
  ExpertPlacement placement = ExpertPlacement::blocked(mc.n_experts, P);
  UmoeAttention att("blk.attn", d, uc, mc, placement, world, 5);
  MoeLayer ffn("blk.moe", d, mc, placement, world, 5, att.experts());
  EXPECT_EQ(&ffn.experts(), &att.experts());
  EXPECT_FALSE(ffn.owns_experts());
  for (const ParamRef& p : ffn.params())  // the experts are listed by their owner only
    EXPECT_EQ(p.name.find(".expert."), std::string::npos) << p.name;

  Tensor x({T, d}), dy({T, d}), y_att({T, d}), y1({T, d}), y2({T, d}), dx({T, d});
  randomize(x.view(), 31);
  randomize(dy.view(), 32);
  auto expert_grads = [&] {
    std::vector<float> g;
    for (ParamRef& p : att.experts().params())
      for (int64_t i = 0; i < p.grad.rows; ++i)
        g.insert(g.end(), p.grad.row(i), p.grad.row(i) + p.grad.cols);
    return g;
  };
  // Each path alone, then both: the expert gradients add up.
  att.zero_grad();
  att.forward(x.view(), n_seq, y_att.view());
  att.backward(dy.view(), dx.view());
  const std::vector<float> g_att = expert_grads();
  att.zero_grad();
  ffn.forward(x.view(), y1.view());
  ffn.backward(dy.view(), dx.view());
  const std::vector<float> g_ffn = expert_grads();
  att.zero_grad();
  att.forward(x.view(), n_seq, y_att.view());
  ffn.forward(x.view(), y1.view());
  ffn.backward(dy.view(), dx.view());
  att.backward(dy.view(), dx.view());
  const std::vector<float> g_both = expert_grads();
  double worst = 0, norm = 0;
  for (size_t i = 0; i < g_both.size(); ++i) {
    worst = std::max(worst, double(std::fabs(g_both[i] - g_att[i] - g_ffn[i])));
    norm = std::max(norm, double(std::fabs(g_att[i])) + std::fabs(g_ffn[i]));
  }
  EXPECT_LE(worst, 1e-5 * (1 + norm));

  // An SGD step on the experts from the attention path alone changes the FFN's output.
  att.zero_grad();
  att.forward(x.view(), n_seq, y_att.view());
  att.backward(dy.view(), dx.view());
  double gsum = 0;
  for (ParamRef& p : att.experts().params())
    for (int64_t i = 0; i < p.value.rows; ++i)
      for (int64_t j = 0; j < p.value.cols; ++j) {
        p.value(i, j) -= 0.1f * p.grad(i, j);
        gsum += std::fabs(p.grad(i, j));
      }
  world.allreduce_sum(&gsum, 1);
  EXPECT_GT(gsum, 0.0);
  ffn.forward(x.view(), y2.view());
  double change = 0;
  for (int64_t i = 0; i < T * d; ++i) change = std::max(change, double(std::fabs(y2[i] - y1[i])));
  world.allreduce_max(&change, 1);
  EXPECT_GT(change, 1e-4);
  ffn.backward(dy.view(), dx.view());  // keep the collective order symmetric
}

}  // namespace
