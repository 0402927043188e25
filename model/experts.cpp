#include "model/experts.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "model/buffers.hpp"
#include "model/layers/activation.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

namespace {

constexpr int64_t kMinRows = 64;   // smallest row block worth a GEMM call of its own
constexpr int64_t kSubRows = 512;  // rows of the per-thread dL/da scratch in backward
constexpr int64_t kColAlign = 64;  // column blocks of f start on 256-byte boundaries
using act::gelu;
using act::gelu_grad;
using act::sigmoid;

// a = act(h) for n rows; h rows have f1 columns, a rows f.
void activate(Activation act, const float* h, int64_t ldh, float* a, int64_t lda, int64_t n,
              int64_t f) {
  for (int64_t i = 0; i < n; ++i) {
    const float* hr = h + i * ldh;
    float* ar = a + i * lda;
    if (act == Activation::kGelu) {
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) ar[j] = gelu(hr[j]);
    } else {
      const float* ur = hr + f;
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) ar[j] = hr[j] * sigmoid(hr[j]) * ur[j];
    }
  }
}

// h <- dL/dh from da = dL/da and the pre-activation h, in place.
void activate_backward(Activation act, const float* da, int64_t ldda, float* h, int64_t ldh,
                       int64_t n, int64_t f) {
  for (int64_t i = 0; i < n; ++i) {
    const float* dar = da + i * ldda;
    float* hr = h + i * ldh;
    if (act == Activation::kGelu) {
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) hr[j] = dar[j] * gelu_grad(hr[j]);
    } else {
      float* ur = hr + f;
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) {
        const float g = hr[j], u = ur[j], s = sigmoid(g);
        hr[j] = dar[j] * u * s * (1.0f + g * (1.0f - s));  // d silu(g) = s (1 + g (1 - s))
        ur[j] = dar[j] * g * s;
      }
    }
  }
}

}  // namespace

Activation parse_activation(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "swiglu") return Activation::kSwiglu;
  throw Error(ErrorKind::kConfig, cat("unknown expert activation '", name, "' (gelu | swiglu)"));
}

const char* activation_name(Activation a) {
  return a == Activation::kGelu ? "gelu" : "swiglu";
}

ExpertBank::ExpertBank(int64_t d_model, int64_t d_ff, Activation activation,
                       std::vector<int> global_ids, uint64_t seed)
    : d_(d_model),
      f_(d_ff),
      f1_(activation == Activation::kSwiglu ? 2 * d_ff : d_ff),
      act_(activation),
      global_ids_(std::move(global_ids)) {
  MOE_CHECK(d_ >= 1 && f_ >= 1, "expert bank: d_model ", d_, ", d_ff ", f_);
  const int64_t El = n_local();
  w1_ = Tensor({El, d_, f1_});
  dw1_ = Tensor({El, d_, f1_});
  w2_ = Tensor({El, f_, d_});
  dw2_ = Tensor({El, f_, d_});
  const float b1 = 1.0f / std::sqrt(static_cast<float>(d_));
  const float b2 = 1.0f / std::sqrt(static_cast<float>(f_));
  for (int64_t e = 0; e < El; ++e) {
    const int g = global_ids_[e];
    init_uniform(w1_.slab(e), b1, seed,
                 init_stream(act_ == Activation::kGelu ? "expert.w1" : "expert.w_gate_up", g));
    init_uniform(w2_.slab(e), b2, seed, init_stream("expert.w2", g));
  }
  scratch_.resize(static_cast<size_t>(std::max(1, omp_get_max_threads())));
}

std::vector<ParamRef> ExpertBank::params() {
  std::vector<ParamRef> out;
  for (int e = 0; e < n_local(); ++e) {
    const std::string p = cat("expert.", global_ids_[e], ".");
    out.push_back({p + "w1", w1(e), dw1(e), nullptr, is_replica(e)});
    out.push_back({p + "w2", w2(e), dw2(e), nullptr, is_replica(e)});
  }
  return out;
}

void ExpertBank::set_replicas(std::vector<uint8_t> replica) {
  MOE_CHECK(replica.empty() || static_cast<int>(replica.size()) == n_local(),
            "expert bank: ", replica.size(), " replica flags for ", n_local(), " experts");
  replica_ = std::move(replica);
}

void ExpertBank::zero_grad() {
  dw1_.zero();
  dw2_.zero();
}

double ExpertBank::flops_fwd_bwd(int64_t rows) const {
  return 3.0 * 2.0 * static_cast<double>(rows) * (d_ * f1_ + f_ * d_);
}

std::vector<ExpertBank::Task> ExpertBank::row_tasks(const std::vector<int64_t>& offsets) const {
  const int64_t R = offsets.back();
  const int64_t threads = std::max(1, omp_get_max_threads());
  // About two tasks per thread over all rows; a large expert splits into equal blocks.
  const int64_t target = std::max(kMinRows, (R + 2 * threads - 1) / (2 * threads));
  std::vector<Task> tasks;
  for (int e = 0; e < n_local(); ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    const int64_t nb = threads == 1 ? 1 : (n + target - 1) / target;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t lo = n * b / nb, hi = n * (b + 1) / nb;
      tasks.push_back({e, offsets[e] + lo, hi - lo});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.n > b.n; });
  return tasks;
}

std::vector<ExpertBank::Task> ExpertBank::col_tasks(const std::vector<int64_t>& offsets) const {
  const int64_t R = offsets.back();
  const int64_t threads = std::max(1, omp_get_max_threads());
  const int64_t max_blocks = std::max<int64_t>(1, f_ / kColAlign);
  const double target = double(R) / double(2 * threads);  // rows' worth of work per task
  std::vector<Task> tasks;
  std::vector<int64_t> work;
  for (int e = 0; e < n_local(); ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    int64_t nb = threads == 1 ? 1 : static_cast<int64_t>(std::ceil(double(n) / target));
    nb = std::clamp<int64_t>(nb, 1, max_blocks);
    const int64_t width = (f_ + nb - 1) / nb;
    const int64_t step = nb == 1 ? f_ : (width + kColAlign - 1) / kColAlign * kColAlign;
    for (int64_t c = 0; c < f_; c += step) {
      tasks.push_back({e, c, std::min(step, f_ - c)});
      work.push_back(n * std::min(step, f_ - c));
    }
  }
  std::vector<size_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return work[a] > work[b]; });
  std::vector<Task> sorted;
  for (size_t i : order) sorted.push_back(tasks[i]);
  return sorted;
}

void ExpertBank::forward(ConstView x, const std::vector<int64_t>& offsets, View y,
                         ExpertCache& cache) {
  MOE_CHECK_EQ(static_cast<int64_t>(offsets.size()), int64_t{n_local()} + 1,
               "expert_bank.forward offsets");
  const int64_t R = offsets.back();
  MOE_CHECK_SHAPE(x, R, d_, "expert_bank.forward x");
  MOE_CHECK_SHAPE(y, R, d_, "expert_bank.forward y");
  cache.x = x;
  cache.offsets = offsets;
  View h = scratch(cache.h, R, f1_);
  View a = scratch(cache.a, R, f_);
  const std::vector<Task> tasks = row_tasks(offsets);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_tasks; ++i) {
    const Task& t = tasks[i];
    View hb = h.row_range(t.begin, t.n), ab = a.row_range(t.begin, t.n);
    gemm(Trans::kNo, Trans::kNo, 1.0f, x.row_range(t.begin, t.n), w1(t.e), 0.0f, hb);
    activate(act_, hb.data, hb.ld, ab.data, ab.ld, t.n, f_);
    gemm(Trans::kNo, Trans::kNo, 1.0f, ab, w2(t.e), 0.0f, y.row_range(t.begin, t.n));
  }
}

void ExpertBank::pack_for_inference(WeightType weights) {
  if (weights == WeightType::kBf16) round_to_bf16();
  auto pack = weights == WeightType::kBf16 ? pack_b_bf16 : pack_b;
  packed1_.resize(static_cast<size_t>(n_local()));
  packed2_.resize(static_cast<size_t>(n_local()));
  for (int e = 0; e < n_local(); ++e) {
    pack(w1(e), packed1_[static_cast<size_t>(e)]);
    pack(w2(e), packed2_[static_cast<size_t>(e)]);
  }
}

void ExpertBank::round_to_bf16() {
  for (int e = 0; e < n_local(); ++e) {
    moe::round_to_bf16(w1(e));
    moe::round_to_bf16(w2(e));
  }
}

void ExpertBank::infer(ConstView x, const std::vector<int64_t>& offsets, View y) {
  MOE_CHECK(packed_for_inference(), "expert_bank.infer: pack_for_inference() first");
  MOE_CHECK_EQ(static_cast<int64_t>(offsets.size()), int64_t{n_local()} + 1,
               "expert_bank.infer offsets");
  const int64_t R = offsets.back();
  MOE_CHECK_SHAPE(x, R, d_, "expert_bank.infer x");
  MOE_CHECK_SHAPE(y, R, d_, "expert_bank.infer y");
  View h = scratch(h_infer_, R, f1_);
  View a = scratch(a_infer_, R, f_);
  const std::vector<Task> tasks = row_tasks(offsets);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_tasks; ++i) {
    const Task& t = tasks[i];
    View hb = h.row_range(t.begin, t.n), ab = a.row_range(t.begin, t.n);
    gemm_packed(x.row_range(t.begin, t.n), packed1_[static_cast<size_t>(t.e)], hb);
    activate(act_, hb.data, hb.ld, ab.data, ab.ld, t.n, f_);
    gemm_packed(ab, packed2_[static_cast<size_t>(t.e)], y.row_range(t.begin, t.n));
  }
}

void ExpertBank::backward(ConstView dy, View dx, ExpertCache& cache) {
  const std::vector<int64_t>& offsets = cache.offsets;
  const int64_t R = offsets.empty() ? 0 : offsets.back();
  MOE_CHECK_SHAPE(dy, R, d_, "expert_bank.backward dy");
  MOE_CHECK_SHAPE(dx, R, d_, "expert_bank.backward dx");
  if (R == 0) return;
  if (scratch_.size() < static_cast<size_t>(omp_get_max_threads()))
    scratch_.resize(static_cast<size_t>(omp_get_max_threads()));
  View h(cache.h.data(), R, f1_);
  ConstView a(cache.a.data(), R, f_);
  const std::vector<Task> rows = row_tasks(offsets);
  const std::vector<Task> cols = col_tasks(offsets);
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  const int64_t n_cols = static_cast<int64_t>(cols.size());
#pragma omp parallel
  {
    Tensor& buf = scratch_[static_cast<size_t>(omp_get_thread_num())];
    // 1. dh = (dy W2^T) * act'(h), in place of h, in sub-blocks through per-thread scratch.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_rows; ++i) {
      const Task& t = rows[i];
      for (int64_t r = t.begin; r < t.begin + t.n; r += kSubRows) {
        const int64_t n = std::min(kSubRows, t.begin + t.n - r);
        View da = scratch(buf, n, f_);
        gemm(Trans::kNo, Trans::kYes, 1.0f, dy.row_range(r, n), w2(t.e), 0.0f, da);
        View hb = h.row_range(r, n);
        activate_backward(act_, da.data, da.ld, hb.data, hb.ld, n, f_);
      }
    }
    // 2. dW2[cols] += a[:, cols]^T dy;  dW1[:, cols] += x^T dh[:, cols] (gate and up for SwiGLU).
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_cols; ++i) {
      const Task& t = cols[i];
      const int64_t r0 = offsets[t.e], n = offsets[t.e + 1] - r0;
      ConstView xe = cache.x.row_range(r0, n);
      gemm(Trans::kYes, Trans::kNo, 1.0f, a.row_range(r0, n).col_range(t.begin, t.n),
           dy.row_range(r0, n), 1.0f, dw2(t.e).row_range(t.begin, t.n));
      gemm(Trans::kYes, Trans::kNo, 1.0f, xe, h.row_range(r0, n).col_range(t.begin, t.n), 1.0f,
           dw1(t.e).col_range(t.begin, t.n));
      if (act_ == Activation::kSwiglu)
        gemm(Trans::kYes, Trans::kNo, 1.0f, xe, h.row_range(r0, n).col_range(f_ + t.begin, t.n),
             1.0f, dw1(t.e).col_range(f_ + t.begin, t.n));
    }
    // 3. dx = dh W1^T (x is no longer needed, so dx may alias it).
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_rows; ++i) {
      const Task& t = rows[i];
      gemm(Trans::kNo, Trans::kYes, 1.0f, h.row_range(t.begin, t.n), w1(t.e), 0.0f,
           dx.row_range(t.begin, t.n));
    }
  }
}

}  // namespace moe::model
