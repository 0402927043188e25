// File: activation.hpp — element-wise activations of the dense FFN and the experts, vectorisable.
//
// One definition for both, so a dense FFN layer and an expert with the same weights give the
// same numbers:
//   GELU    erf form 0.5 h (1 + erf(h / sqrt 2)) (torch.nn.GELU() default), erf from
//           Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7);
//   SwiGLU  silu(g) u, silu(g) = g sigmoid(g).
// exp is a polynomial (Cody-Waite reduction, Cephes expf coefficients, about 1 ulp) so that the
// loops vectorise under `omp simd`.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace moe::model::act {

// exp(x) for x clamped to [-87, 88]: never 0 or inf.
inline float exp_approx(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  const float n = (x * 1.44269504089f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return e * std::bit_cast<float>(bits);
}

// A causal attention row of `width` scores: softmax over columns 0..last (a stable one: minus
// the row maximum), exact zeros in last+1..width-1. The fast form (exp_approx, float sum) serves
// the attention layer; the exact form (std::exp, double sum) serves UMoE attention, whose tests
// hold it to a double-precision reference.
inline void softmax_causal_row(float* r, int64_t last, int64_t width) {
  float m = r[0];
  for (int64_t j = 1; j <= last; ++j) m = std::max(m, r[j]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j <= last; ++j) {
    r[j] = exp_approx(r[j] - m);
    sum += r[j];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j <= last; ++j) r[j] *= inv;
  for (int64_t j = last + 1; j < width; ++j) r[j] = 0.0f;
}

inline void softmax_causal_row_exact(float* r, int64_t last, int64_t width) {
  float m = r[0];
  for (int64_t j = 1; j <= last; ++j) m = std::max(m, r[j]);
  double sum = 0.0;
  for (int64_t j = 0; j <= last; ++j) {
    r[j] = std::exp(r[j] - m);
    sum += r[j];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = 0; j <= last; ++j) r[j] *= inv;
  for (int64_t j = last + 1; j < width; ++j) r[j] = 0.0f;
}

// cdf2 = 1 + erf(h / sqrt 2), pdf = phi(h), from one exponential.
inline void gelu_parts(float h, float& cdf2, float& pdf) {
  const float u = std::abs(h) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * u);
  const float g = exp_approx(-u * u);
  const float poly =
      t * (0.254829592f +
           t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float q = poly * g;  // erfc(|u|)
  cdf2 = h < 0.0f ? q : 2.0f - q;
  pdf = g * 0.39894228040143268f;
}

inline float gelu(float h) {
  float cdf2, pdf;
  gelu_parts(h, cdf2, pdf);
  return 0.5f * h * cdf2;
}

inline float gelu_grad(float h) {
  float cdf2, pdf;
  gelu_parts(h, cdf2, pdf);
  return 0.5f * cdf2 + h * pdf;
}

inline float sigmoid(float g) {
  return 1.0f / (1.0f + exp_approx(-g));
}

}  // namespace moe::model::act
