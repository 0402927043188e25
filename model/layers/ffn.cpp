#include "model/layers/ffn.hpp"

#include <cmath>

#include "model/buffers.hpp"
#include "model/layers/activation.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

Ffn::Ffn(std::string name, int64_t d_model, int64_t d_ff, Activation activation, uint64_t seed)
    : name_(std::move(name)),
      d_(d_model),
      f_(d_ff),
      f1_(activation == Activation::kSwiglu ? 2 * d_ff : d_ff),
      act_(activation) {
  MOE_CHECK(d_ >= 1 && f_ >= 1, name_, ": d_model ", d_, ", d_ff ", f_);
  w1_ = Tensor({d_, f1_});
  dw1_ = Tensor({d_, f1_});
  w2_ = Tensor({f_, d_});
  dw2_ = Tensor({f_, d_});
  init_uniform(w1_.view(), 1.0f / std::sqrt(static_cast<float>(d_)), seed,
               init_stream((name_ + ".w1").c_str(), 0));
  init_uniform(w2_.view(), 1.0f / std::sqrt(static_cast<float>(f_)), seed,
               init_stream((name_ + ".w2").c_str(), 0));
}

std::vector<ParamRef> Ffn::params() {
  return {{name_ + ".w1", w1_.view(), dw1_.view()}, {name_ + ".w2", w2_.view(), dw2_.view()}};
}

void Ffn::zero_grad() {
  dw1_.zero();
  dw2_.zero();
}

void Ffn::forward(ConstView x, View y) {
  const int64_t n = x.rows;
  MOE_CHECK_SHAPE(x, n, d_, cat(name_, ".forward x"));
  MOE_CHECK_SHAPE(y, n, d_, cat(name_, ".forward y"));
  x_ = x;
  View h = scratch(h_, n, f1_);
  View a = scratch(a_, n, f_);
  gemm(Trans::kNo, Trans::kNo, 1.0f, x, w1_.view(), 0.0f, h);
  const int64_t f = f_;
  const bool gelu = act_ == Activation::kGelu;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* hr = h.row(i);
    float* ar = a.row(i);
    if (gelu) {
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) ar[j] = act::gelu(hr[j]);
    } else {
      const float* ur = hr + f;
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) ar[j] = hr[j] * act::sigmoid(hr[j]) * ur[j];
    }
  }
  gemm(Trans::kNo, Trans::kNo, 1.0f, a, w2_.view(), 0.0f, y);
}

void Ffn::backward(ConstView dy, View dx) {
  const int64_t n = x_.rows;
  MOE_CHECK_SHAPE(dy, n, d_, cat(name_, ".backward dy"));
  MOE_CHECK_SHAPE(dx, n, d_, cat(name_, ".backward dx"));
  View h(h_.data(), n, f1_);
  ConstView a(a_.data(), n, f_);
  View da = scratch(da_, n, f_);
  // dW2 += a^T dy;  da = dy W2^T.
  gemm(Trans::kYes, Trans::kNo, 1.0f, a, dy, 1.0f, dw2_.view());
  gemm(Trans::kNo, Trans::kYes, 1.0f, dy, w2_.view(), 0.0f, da);
  // dh = da * act'(h), in place of h.
  const int64_t f = f_;
  const bool gelu = act_ == Activation::kGelu;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* dar = da.row(i);
    float* hr = h.row(i);
    if (gelu) {
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) hr[j] = dar[j] * act::gelu_grad(hr[j]);
    } else {
      float* ur = hr + f;
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) {
        const float g = hr[j], u = ur[j], s = act::sigmoid(g);
        hr[j] = dar[j] * u * s * (1.0f + g * (1.0f - s));  // d silu(g) = s (1 + g (1 - s))
        ur[j] = dar[j] * g * s;
      }
    }
  }
  // dW1 += x^T dh, then dx = dh W1^T (x is no longer needed, so dx may alias it).
  gemm(Trans::kYes, Trans::kNo, 1.0f, x_, h, 1.0f, dw1_.view());
  gemm(Trans::kNo, Trans::kYes, 1.0f, h, w1_.view(), 0.0f, dx);
}

}  // namespace moe::model
