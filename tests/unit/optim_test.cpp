// AdamW against hand-computed updates, the no-decay flag, the learning-rate schedule and
// clipping by a global norm. Tolerances: 1e-6 absolute on fp32 parameters of order 1, 1e-6
// relative on the moments, 1e-12 on the double schedule.
#include "model/optim.hpp"

#include "comm/allreduce.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

using moe::Tensor;
using moe::View;
using moe::model::AdamW;
using moe::model::AdamWOptions;
using moe::model::LrSchedule;
using moe::model::ParamRef;

namespace {

struct Param {
  Tensor value = Tensor({1, 3});
  Tensor grad = Tensor({1, 3});
  Param() {
    value[0] = 1.0f, value[1] = -2.0f, value[2] = 0.5f;
    grad[0] = 0.1f, grad[1] = -0.2f, grad[2] = 0.0f;
  }
  ParamRef ref(const char* name) { return {name, value.view(), grad.view()}; }
};

}  // namespace

TEST(AdamW, TwoStepsMatchHandComputedValues) {
  // b1 = 0.9, b2 = 0.999, lr = 0.01, wd = 0.1. Step 1: m = 0.1 g, v = 0.001 g^2, so
  // m / (1 - b1) = g and sqrt(v / (1 - b2)) = |g|: the update is lr * sign(g) (up to eps), and
  // decay multiplies by 1 - lr wd = 0.999. Step 2 with the same g: m = 0.19 g, 1 - b1^2 = 0.19;
  // v = 0.001999 g^2, 1 - b2^2 = 0.001999: the same unit update again.
  Param a, b;
  AdamW opt({.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1});
  opt.add(a.ref("layer0.attn.w_qkv"), true);
  opt.add(b.ref("layer0.norm1.g"), false);
  EXPECT_TRUE(opt.decay(0));
  EXPECT_FALSE(opt.decay(1));

  opt.step(0.01);
  EXPECT_NEAR(a.value[0], 1.0 * 0.999 - 0.01, 1e-6);
  EXPECT_NEAR(a.value[1], -2.0 * 0.999 + 0.01, 1e-6);
  EXPECT_NEAR(a.value[2], 0.5 * 0.999, 1e-6);  // zero gradient: decay only
  EXPECT_NEAR(b.value[0], 1.0 - 0.01, 1e-6);   // no decay
  EXPECT_NEAR(b.value[1], -2.0 + 0.01, 1e-6);
  EXPECT_EQ(b.value[2], 0.5f);
  EXPECT_NEAR(opt.state(0).m[0], 0.01, 1e-6 * 0.01);
  EXPECT_NEAR(opt.state(0).v[1], 4e-5, 1e-6 * 4e-5);
  EXPECT_EQ(opt.state(0).step, 1);

  opt.step(0.01);
  EXPECT_NEAR(a.value[0], (1.0 * 0.999 - 0.01) * 0.999 - 0.01, 1e-6);
  EXPECT_NEAR(b.value[1], -2.0 + 0.02, 1e-6);
  EXPECT_NEAR(opt.state(1).m[0], 0.019, 1e-6 * 0.019);
  EXPECT_NEAR(opt.state(1).v[0], 1.999e-5, 1e-6 * 1.999e-5);
  EXPECT_EQ(opt.state(1).step, 2);
}

TEST(AdamW, DefaultDecayFlagsAndLookup) {
  using moe::model::decays_by_default;
  EXPECT_TRUE(decays_by_default("embed.weight"));
  EXPECT_TRUE(decays_by_default("expert.3.w1"));
  EXPECT_FALSE(decays_by_default("layer2.norm1.g"));
  EXPECT_FALSE(decays_by_default("final_norm"));
  EXPECT_FALSE(decays_by_default("layer0.attn.bias"));
  EXPECT_FALSE(decays_by_default("lm_head.b"));
  Param a, b;
  AdamW opt;
  opt.add({a.ref("w"), b.ref("final_norm.g")});
  EXPECT_TRUE(opt.decay(0));
  EXPECT_FALSE(opt.decay(1));
  EXPECT_EQ(opt.find("final_norm.g"), 1);
  EXPECT_EQ(opt.find("nothing"), -1);
  EXPECT_THROW(opt.add(a.ref("w")), moe::Error);
}

TEST(AdamW, StridedViewsAndDeterminism) {
  // A column window of a wider buffer is updated alone; two identical runs agree bitwise.
  Tensor v1({4, 6}), g1({4, 6}), v2({4, 6}), g2({4, 6});
  for (int64_t k = 0; k < 24; ++k) {
    v1[k] = v2[k] = 0.1f * static_cast<float>(k);
    g1[k] = g2[k] = std::sin(static_cast<float>(k));
  }
  AdamW o1, o2;
  o1.add({"w", v1.view().col_range(1, 3), g1.view().col_range(1, 3)});
  o2.add({"w", v2.view().col_range(1, 3), g2.view().col_range(1, 3)});
  for (int s = 0; s < 3; ++s) o1.step(1e-2), o2.step(1e-2);
  for (int64_t k = 0; k < 24; ++k) {
    EXPECT_EQ(v1[k], v2[k]);
    const int64_t j = k % 6;
    if (j < 1 || j >= 4) {
      EXPECT_EQ(v1[k], 0.1f * static_cast<float>(k)) << "outside the window, element " << k;
    } else {
      EXPECT_NE(v1[k], 0.1f * static_cast<float>(k)) << "inside the window, element " << k;
    }
  }
}

TEST(AdamW, GradScaleEqualsClippingTheGradientsFirst) {
  // step(lr, f) on the raw gradients is bitwise clip_grad_norm (in place) then step(lr).
  Tensor v1({3, 5}), g1({3, 5}), v2({3, 5}), g2({3, 5});
  for (int64_t k = 0; k < 15; ++k) {
    v1[k] = v2[k] = 0.3f * static_cast<float>(k) - 2.0f;
    g1[k] = g2[k] = 3.0f * std::cos(static_cast<float>(k));
  }
  AdamW o1, o2;
  o1.add({"w", v1.view(), g1.view()});
  o2.add({"w", v2.view(), g2.view()});
  const double norm = 7.5, max_norm = 1.0;
  for (int s = 0; s < 3; ++s) {
    const float f = moe::model::clip_factor(norm, max_norm);
    EXPECT_NEAR(f, 1.0 / 7.5, 1e-7);
    o1.step(1e-2, f);
    std::vector<View> grads = {g2.view()};
    EXPECT_EQ(moe::model::clip_grad_norm(grads, norm, max_norm), static_cast<double>(f));
    o2.step(1e-2);
    for (int64_t k = 0; k < 15; ++k) g2[k] = g1[k];  // the next step's raw gradient
  }
  for (int64_t k = 0; k < 15; ++k) {
    EXPECT_EQ(v1[k], v2[k]) << k;
    EXPECT_EQ(o1.state(0).m[k], o2.state(0).m[k]) << k;
    EXPECT_EQ(o1.state(0).v[k], o2.state(0).v[k]) << k;
  }
  EXPECT_EQ(moe::model::clip_factor(0.5, 1.0), 1.0f);
  EXPECT_EQ(moe::model::clip_factor(5.0, 0.0), 1.0f);
}

TEST(LrSchedule, WarmupPeakCosineAndEnd) {
  LrSchedule s{.lr = 1.0, .min_lr = 0.1, .warmup_steps = 10, .total_steps = 110};
  EXPECT_NEAR(s.at(0), 0.1, 1e-12);
  EXPECT_NEAR(s.at(4), 0.5, 1e-12);
  EXPECT_NEAR(s.at(9), 1.0, 1e-12);    // end of warmup: peak
  EXPECT_NEAR(s.at(10), 1.0, 1e-12);   // cosine starts at the peak
  EXPECT_NEAR(s.at(60), 0.55, 1e-12);  // half way: the mean of lr and min_lr
  EXPECT_NEAR(s.at(35), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI / 4)), 1e-12);
  EXPECT_NEAR(s.at(110), 0.1, 1e-12);
  EXPECT_NEAR(s.at(5000), 0.1, 1e-12);
  for (int64_t k = 10; k < 110; ++k) EXPECT_GE(s.at(k), s.at(k + 1));
  LrSchedule none{.lr = 2.0, .min_lr = 2.0, .warmup_steps = 0, .total_steps = 5};
  EXPECT_NEAR(none.at(0), 2.0, 1e-12);
  EXPECT_NEAR(none.at(3), 2.0, 1e-12);
}

TEST(ClipGradNorm, ScalesOnlyAboveTheThreshold) {
  Tensor a({1, 1}), b({1, 1});
  a[0] = 3.0f, b[0] = 4.0f;  // global norm 5
  std::vector<View> grads = {a.view(), b.view()};
  EXPECT_DOUBLE_EQ(moe::model::clip_grad_norm(grads, 5.0, 10.0), 1.0);
  EXPECT_EQ(a[0], 3.0f);
  EXPECT_DOUBLE_EQ(moe::model::clip_grad_norm(grads, 5.0, 0.0), 1.0);  // disabled
  EXPECT_DOUBLE_EQ(moe::model::clip_grad_norm(grads, std::numeric_limits<double>::quiet_NaN(), 1.0),
                   1.0);
  EXPECT_EQ(a[0], 3.0f);
  EXPECT_NEAR(moe::model::clip_grad_norm(grads, 5.0, 1.0), 0.2, 1e-7);
  EXPECT_NEAR(a[0], 0.6f, 1e-7);
  EXPECT_NEAR(b[0], 0.8f, 1e-7);
  EXPECT_NEAR(std::hypot(a[0], b[0]), 1.0, 1e-6);
}

// PEER's row-sparse gradients: the norm and the clipping that visit only the touched rows (in any
// order) give bit-identical results to the full scans, because every other row is exactly zero.
TEST(ClipGradNorm, RowSparseNormAndClipEqualFullScans) {
  Tensor g({64, 33}), full({64, 33});
  const std::vector<int64_t> rows = {40, 5, 63, 17, 0};
  for (int64_t r : rows)
    for (int64_t j = 0; j < 33; ++j) g.view().row(r)[j] = std::sin(0.37f * float(r * 33 + j)) * 3;
  for (int64_t i = 0; i < g.view().size(); ++i) full[i] = g[i];
  EXPECT_EQ(moe::comm::sum_squares_rows(g.view(), rows), moe::comm::sum_squares(full.view()));
  const double norm = std::sqrt(moe::comm::sum_squares(full.view()));
  std::vector<View> sparse_grads = {g.view()}, full_grads = {full.view()};
  const std::vector<const std::vector<int64_t>*> sparse_rows = {&rows};
  EXPECT_EQ(moe::model::clip_grad_norm(sparse_grads, norm, 1.0, sparse_rows),
            moe::model::clip_grad_norm(full_grads, norm, 1.0));
  for (int64_t i = 0; i < g.view().size(); ++i) ASSERT_EQ(g[i], full[i]) << i;
}
