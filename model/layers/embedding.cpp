#include "model/layers/embedding.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moe::model {

namespace {
constexpr int64_t kColBlock = 16;  // columns per backward task (64 bytes)
}

Embedding::Embedding(std::string name, int64_t vocab_size, int64_t d_model, uint64_t seed)
    : name_(std::move(name)), v_(vocab_size), d_(d_model) {
  MOE_CHECK(v_ >= 1 && d_ >= 1, name_, ": vocab ", v_, ", d_model ", d_);
  w_ = Tensor({v_, d_});
  dw_ = Tensor({v_, d_});
  init_uniform(w_.view(), 0.02f * std::sqrt(3.0f), seed,
               init_stream((name_ + ".weight").c_str(), 0));
}

std::vector<ParamRef> Embedding::params() {
  return {{name_ + ".weight", weight(), grad()}};
}

void Embedding::forward(std::span<const int32_t> ids, View y) {
  const int64_t n = static_cast<int64_t>(ids.size());
  MOE_CHECK_SHAPE(y, n, d_, cat(name_, ".forward y"));
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= v_)
      throw Error(ErrorKind::kData, cat(name_, ": token id ", ids[i], " at position ", i,
                                        " is outside the vocabulary [0, ", v_, ")"));
  ids_.assign(ids.begin(), ids.end());
  const float* w = w_.data();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(y.row(i), w + int64_t{ids[i]} * d_, static_cast<size_t>(d_) * sizeof(float));
}

void Embedding::backward(ConstView dy) {
  const int64_t n = static_cast<int64_t>(ids_.size());
  MOE_CHECK_SHAPE(dy, n, d_, cat(name_, ".backward dy"));
  float* dw = dw_.data();
  const int64_t n_blocks = (d_ + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t c0 = b * kColBlock, nc = std::min(kColBlock, d_ - c0);
    for (int64_t i = 0; i < n; ++i) {
      float* dst = dw + int64_t{ids_[i]} * d_ + c0;
      const float* src = dy.row(i) + c0;
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace moe::model
