#include "model/layers/rms_norm.hpp"

#include <algorithm>
#include <cmath>

#include "model/buffers.hpp"

namespace moe::model {

namespace {
constexpr int64_t kColBlock = 16;  // columns per dg task (64 bytes)
}

RmsNorm::RmsNorm(std::string name, int64_t d_model, float eps)
    : name_(std::move(name)), d_(d_model), eps_(eps) {
  MOE_CHECK(d_ >= 1 && eps_ >= 0.0f, name_, ": d_model ", d_, ", eps ", eps_);
  g_ = Tensor({1, d_});
  dg_ = Tensor({1, d_});
  g_.fill(1.0f);
}

std::vector<ParamRef> RmsNorm::params() {
  return {{name_ + ".gain", gain(), gain_grad()}};
}

void RmsNorm::forward(ConstView x, View y) {
  const int64_t n = x.rows;
  MOE_CHECK_SHAPE(x, n, d_, cat(name_, ".forward x"));
  MOE_CHECK_SHAPE(y, n, d_, cat(name_, ".forward y"));
  x_ = x;
  float* r = scratch(rstd_, 1, n).data;
  const float* g = g_.data();
  const float inv_d = 1.0f / static_cast<float>(d_);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x.row(i);
    float* yr = y.row(i);
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d_; ++j) ss += xr[j] * xr[j];
    const float ri = 1.0f / std::sqrt(ss * inv_d + eps_);
    r[i] = ri;
#pragma omp simd
    for (int64_t j = 0; j < d_; ++j) yr[j] = g[j] * xr[j] * ri;
  }
}

void RmsNorm::backward(ConstView dy, View dx) {
  const int64_t n = x_.rows;
  MOE_CHECK_SHAPE(dy, n, d_, cat(name_, ".backward dy"));
  MOE_CHECK_SHAPE(dx, n, d_, cat(name_, ".backward dx"));
  const float* r = rstd_.data();
  const float* g = g_.data();
  float* dg = dg_.data();
  const ConstView x = x_;
  const float inv_d = 1.0f / static_cast<float>(d_);
  const int64_t n_blocks = (d_ + kColBlock - 1) / kColBlock;
#pragma omp parallel
  {
    // dg first: dx may alias dy.
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t c0 = b * kColBlock, nc = std::min(kColBlock, d_ - c0);
      for (int64_t i = 0; i < n; ++i) {
        const float* xr = x.row(i) + c0;
        const float* dyr = dy.row(i) + c0;
        const float ri = r[i];
#pragma omp simd
        for (int64_t j = 0; j < nc; ++j) dg[c0 + j] += dyr[j] * xr[j] * ri;
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* xr = x.row(i);
      const float* dyr = dy.row(i);
      float* dxr = dx.row(i);
      const float ri = r[i];
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d_; ++j) s += g[j] * dyr[j] * xr[j];
      const float c = ri * ri * s * inv_d;
#pragma omp simd
      for (int64_t j = 0; j < d_; ++j) dxr[j] = ri * (g[j] * dyr[j] - xr[j] * c);
    }
  }
}

}  // namespace moe::model
