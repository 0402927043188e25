#include "model/optim.hpp"

#include <cmath>
#include <numbers>

#include "runtime/error.hpp"

namespace moe::model {

bool decays_by_default(const std::string& name) {
  auto ends_with = [&](const char* s) {
    const std::string suffix(s);
    return name.size() >= suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return name.find("norm") == std::string::npos && name.find("bias") == std::string::npos &&
         !ends_with(".b") && !ends_with(".g");
}

AdamWOptions AdamWOptions::from(const Config& config) {
  AdamWOptions o;
  o.beta1 = config.get_float("train.beta1");
  o.beta2 = config.get_float("train.beta2");
  o.eps = config.get_float("train.eps");
  o.weight_decay = config.get_float("train.weight_decay");
  return o;
}

AdamW::AdamW(AdamWOptions options) : options_(options) {
  MOE_CHECK(options_.beta1 >= 0 && options_.beta1 < 1, "beta1 ", options_.beta1);
  MOE_CHECK(options_.beta2 >= 0 && options_.beta2 < 1, "beta2 ", options_.beta2);
  MOE_CHECK(options_.eps > 0, "eps ", options_.eps);
}

size_t AdamW::add(const ParamRef& param, bool decay) {
  const int64_t rows = std::max<int64_t>(param.value.rows, 1);
  AdamState state;
  state.m = Tensor::zeros({rows, param.value.cols});
  state.v = Tensor::zeros({rows, param.value.cols});
  return add(param, decay, std::move(state));
}

size_t AdamW::add(const ParamRef& param, bool decay, AdamState state) {
  MOE_CHECK(find(param.name) < 0, "parameter '", param.name, "' registered twice");
  MOE_CHECK(param.grad.rows == param.value.rows && param.grad.cols == param.value.cols,
            "parameter '", param.name, "': grad [", param.grad.rows, ", ", param.grad.cols,
            "] vs value [", param.value.rows, ", ", param.value.cols, "]");
  const int64_t rows = std::max<int64_t>(param.value.rows, 1);
  MOE_CHECK(state.m.view().rows == rows && state.m.view().cols == param.value.cols &&
                state.v.view().rows == rows && state.v.view().cols == param.value.cols,
            "parameter '", param.name, "': moments of another shape");
  slots_.push_back(Slot{param, decay, std::move(state)});
  return slots_.size() - 1;
}

int64_t AdamW::find(const std::string& name) const {
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].param.name == name) return static_cast<int64_t>(i);
  return -1;
}

void AdamW::step(double lr, float grad_scale) {
  for (Slot& s : slots_)
    adamw_update(s.param.value, s.param.grad, s.state, lr, s.decay, options_, s.param.sparse_rows,
                 grad_scale);
}

void adamw_update(View value, ConstView grad, AdamState& state, double lr, bool decay,
                  const AdamWOptions& o, const std::vector<int64_t>* rows, float grad_scale) {
  const int64_t t = ++state.step;
  const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(t));
  // 1 - b in double first: 1.0f - 0.999f is off by 1e-5 relative.
  const float b1 = static_cast<float>(o.beta1), b2 = static_cast<float>(o.beta2);
  const float c1 = static_cast<float>(1.0 - o.beta1), c2 = static_cast<float>(1.0 - o.beta2);
  const float keep = decay ? static_cast<float>(1.0 - lr * o.weight_decay) : 1.0f;
  const float step_size = static_cast<float>(lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float eps = static_cast<float>(o.eps);
  const int64_t cols = value.cols;
  float* m = state.m.data();
  float* v = state.v.data();
  const int64_t n_rows = rows ? static_cast<int64_t>(rows->size()) : value.rows;
#pragma omp parallel for schedule(static) if (n_rows * cols > 65536)
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t i = rows ? (*rows)[static_cast<size_t>(r)] : r;
    float* p = value.row(i);
    const float* g = grad.row(i);
    float* mi = m + i * cols;
    float* vi = v + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const float gj = g[j] * grad_scale;
      mi[j] = b1 * mi[j] + c1 * gj;
      vi[j] = b2 * vi[j] + c2 * gj * gj;
      const float denom = std::sqrt(vi[j]) * inv_sqrt_bc2 + eps;
      p[j] = p[j] * keep - step_size * mi[j] / denom;
    }
  }
}

double LrSchedule::at(int64_t step) const {
  if (step < warmup_steps)
    return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (step >= total_steps) return min_lr;
  const double progress =
      static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

float clip_factor(double norm, double max_norm) {
  if (max_norm <= 0 || !std::isfinite(norm) || norm <= max_norm) return 1.0f;
  return static_cast<float>(max_norm / norm);
}

double clip_grad_norm(const std::vector<View>& grads, double norm, double max_norm,
                      const std::vector<const std::vector<int64_t>*>& rows) {
  const float f = clip_factor(norm, max_norm);
  if (f == 1.0f) return 1.0;
  auto scale_row = [f](const View& g, int64_t i) {
    float* r = g.row(i);
    for (int64_t j = 0; j < g.cols; ++j) r[j] *= f;
  };
  for (size_t k = 0; k < grads.size(); ++k) {
    const View& g = grads[k];
    if (k < rows.size() && rows[k]) {
      for (int64_t i : *rows[k]) scale_row(g, i);
    } else {
      for (int64_t i = 0; i < g.rows; ++i) scale_row(g, i);
    }
  }
  return f;
}

}  // namespace moe::model
