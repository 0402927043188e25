#include "model/layers/lm_head.hpp"

#include <algorithm>
#include <cmath>

#include "model/buffers.hpp"
#include "model/layers/activation.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

double softmax_cross_entropy(View logits, std::span<const int32_t> targets, double normaliser,
                             std::vector<double>& row_loss) {
  const int64_t n = logits.rows, V = logits.cols;
  MOE_CHECK_EQ(static_cast<int64_t>(targets.size()), n, "cross_entropy targets");
  MOE_CHECK(normaliser > 0.0, "cross_entropy: normaliser ", normaliser);
  for (int64_t i = 0; i < n; ++i)
    if (targets[i] >= V)
      throw Error(ErrorKind::kData, cat("cross_entropy: target ", targets[i], " at position ", i,
                                        " is outside the vocabulary [0, ", V, ")"));
  const float inv_norm = static_cast<float>(1.0 / normaliser);
  row_loss.assign(static_cast<size_t>(n), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float* r = logits.row(i);
    const int32_t tgt = targets[i];
    if (tgt < 0) {
      std::fill(r, r + V, 0.0f);
      continue;
    }
    float m = r[0];
    for (int64_t j = 1; j < V; ++j) m = std::max(m, r[j]);
    const float z_t = r[tgt] - m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      r[j] = act::exp_approx(r[j] - m);
      sum += r[j];
    }
    // sum >= 1 (the maximum contributes exp(0)), so the log is finite.
    row_loss[static_cast<size_t>(i)] = std::log(static_cast<double>(sum)) - double(z_t);
    const float scale = inv_norm / sum;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) r[j] *= scale;
    r[tgt] -= inv_norm;
  }
  double loss = 0.0;
  for (double l : row_loss) loss += l;
  return loss / normaliser;
}

LmHead::LmHead(std::string name, int64_t vocab_size, int64_t d_model, uint64_t seed)
    : name_(std::move(name)), v_(vocab_size), d_(d_model), tied_(false) {
  MOE_CHECK(v_ >= 1 && d_ >= 1, name_, ": vocab ", v_, ", d_model ", d_);
  own_w_ = Tensor({v_, d_});
  own_dw_ = Tensor({v_, d_});
  init_uniform(own_w_.view(), 1.0f / std::sqrt(static_cast<float>(d_)), seed,
               init_stream((name_ + ".weight").c_str(), 0));
  w_ = own_w_.view();
  dw_ = own_dw_.view();
}

LmHead::LmHead(std::string name, Embedding& tied)
    : name_(std::move(name)),
      v_(tied.vocab_size()),
      d_(tied.d_model()),
      tied_(true),
      w_(tied.weight()),
      dw_(tied.grad()) {}

std::vector<ParamRef> LmHead::params() {
  if (tied_) return {};
  return {{name_ + ".weight", w_, dw_}};
}

void LmHead::zero_grad() {
  if (!tied_) own_dw_.zero();
}

ConstView LmHead::logits(ConstView x) {
  MOE_CHECK_SHAPE(x, x.rows, d_, cat(name_, ".logits x"));
  View out = scratch(logits_, x.rows, v_);
  gemm(Trans::kNo, Trans::kYes, 1.0f, x, w_, 0.0f, out);
  return out;
}

View LmHead::logits_for_backward(ConstView x) {
  logits(x);
  x_ = x;
  return View(logits_.data(), x.rows, v_);
}

double LmHead::forward(ConstView x, std::span<const int32_t> targets, double normaliser) {
  MOE_CHECK_SHAPE(x, static_cast<int64_t>(targets.size()), d_, cat(name_, ".forward x"));
  logits(x);
  x_ = x;
  return softmax_cross_entropy(View(logits_.data(), x.rows, v_), targets, normaliser, row_loss_);
}

void LmHead::backward(View dx) {
  const int64_t n = x_.rows;
  MOE_CHECK_SHAPE(dx, n, d_, cat(name_, ".backward dx"));
  ConstView dlogits(logits_.data(), n, v_);
  gemm(Trans::kYes, Trans::kNo, 1.0f, dlogits, x_, 1.0f, dw_);
  gemm(Trans::kNo, Trans::kNo, 1.0f, dlogits, w_, 0.0f, dx);
}

}  // namespace moe::model
