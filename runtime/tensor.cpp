#include "runtime/tensor.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace moe {

namespace {
// Bytes of all live tensor buffers (capacity) and the most ever live at once.
std::atomic<int64_t> g_live_bytes{0}, g_peak_bytes{0};

void count_alloc(int64_t n_floats) {
  const int64_t now = g_live_bytes.fetch_add(n_floats * 4) + n_floats * 4;
  int64_t peak = g_peak_bytes.load();
  while (now > peak && !g_peak_bytes.compare_exchange_weak(peak, now)) {
  }
}

void count_free(int64_t n_floats) {
  g_live_bytes.fetch_sub(n_floats * 4);
}
}  // namespace

int64_t tensor_bytes_live() {
  return g_live_bytes.load();
}

int64_t tensor_bytes_peak() {
  return g_peak_bytes.load();
}

void View::fill(float v) const {
  for (int64_t i = 0; i < rows; ++i) std::fill(row(i), row(i) + cols, v);
}

Tensor::Tensor(std::initializer_list<int64_t> shape) {
  allocate(shape);
}

Tensor::~Tensor() {
  count_free(capacity_);
  std::free(data_);
}

Tensor::Tensor(Tensor&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      numel_(std::exchange(other.numel_, 0)),
      capacity_(std::exchange(other.capacity_, 0)),
      rank_(std::exchange(other.rank_, 0)),
      shape_(std::exchange(other.shape_, {})) {}

Tensor& Tensor::operator=(Tensor&& other) noexcept {
  if (this != &other) {
    count_free(capacity_);
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    numel_ = std::exchange(other.numel_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
    rank_ = std::exchange(other.rank_, 0);
    shape_ = std::exchange(other.shape_, {});
  }
  return *this;
}

void Tensor::allocate(std::initializer_list<int64_t> shape) {
  MOE_CHECK(shape.size() >= 1 && shape.size() <= kMaxRank, "tensor rank ", shape.size());
  int64_t n = 1;
  int r = 0;
  shape_ = {};
  for (int64_t d : shape) {
    MOE_CHECK(d >= 0, "negative tensor dimension ", d);
    shape_[r++] = d;
    n *= d;
  }
  rank_ = r;
  numel_ = n;
  if (n > capacity_) {
    count_free(capacity_);
    std::free(data_);
    data_ = nullptr;
    capacity_ = 0;
    // Round the byte count up to the alignment, as aligned_alloc requires.
    size_t bytes =
        (static_cast<size_t>(n) * sizeof(float) + kAlignment - 1) / kAlignment * kAlignment;
    data_ = static_cast<float*>(std::aligned_alloc(kAlignment, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
    capacity_ = n;
    count_alloc(n);
  }
  if (n > 0) std::memset(data_, 0, static_cast<size_t>(n) * sizeof(float));
}

void Tensor::resize(std::initializer_list<int64_t> shape) {
  allocate(shape);
}

Tensor Tensor::clone() const {
  Tensor t;
  t.rank_ = rank_;
  t.shape_ = shape_;
  t.numel_ = numel_;
  if (numel_ > 0) {
    size_t bytes =
        (static_cast<size_t>(numel_) * sizeof(float) + kAlignment - 1) / kAlignment * kAlignment;
    t.data_ = static_cast<float*>(std::aligned_alloc(kAlignment, bytes));
    if (t.data_ == nullptr) throw std::bad_alloc();
    t.capacity_ = numel_;
    count_alloc(numel_);
    std::memcpy(t.data_, data_, static_cast<size_t>(numel_) * sizeof(float));
  }
  return t;
}

int64_t Tensor::dim(int i) const {
  MOE_CHECK(i >= 0 && i < rank_, "dim ", i, " of a rank-", rank_, " tensor");
  return shape_[i];
}

std::string Tensor::shape_string() const {
  std::string s = "[";
  for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(shape_[i]);
  return s + "]";
}

namespace {
// Product of dimensions [first, rank - 1): the row count of a matrix view.
int64_t leading(const std::array<int64_t, Tensor::kMaxRank>& shape, int first, int rank) {
  int64_t n = 1;
  for (int i = first; i < rank - 1; ++i) n *= shape[i];
  return n;
}
}  // namespace

View Tensor::view() {
  if (rank_ == 0) return View();
  if (rank_ == 1) return View(data_, 1, shape_[0]);
  return View(data_, leading(shape_, 0, rank_), shape_[rank_ - 1]);
}

ConstView Tensor::view() const {
  if (rank_ == 0) return ConstView();
  if (rank_ == 1) return ConstView(data_, 1, shape_[0]);
  return ConstView(data_, leading(shape_, 0, rank_), shape_[rank_ - 1]);
}

View Tensor::slab(int64_t i) {
  MOE_CHECK(rank_ >= 2 && i >= 0 && i < shape_[0], "slab ", i, " of ", shape_string());
  int64_t rows = rank_ == 2 ? 1 : leading(shape_, 1, rank_);
  int64_t cols = shape_[rank_ - 1];
  return View(data_ + i * rows * cols, rows, cols);
}

ConstView Tensor::slab(int64_t i) const {
  MOE_CHECK(rank_ >= 2 && i >= 0 && i < shape_[0], "slab ", i, " of ", shape_string());
  int64_t rows = rank_ == 2 ? 1 : leading(shape_, 1, rank_);
  int64_t cols = shape_[rank_ - 1];
  return ConstView(data_ + i * rows * cols, rows, cols);
}

void Tensor::fill(float v) {
  std::fill(data_, data_ + numel_, v);
}

void copy(ConstView in, View out) {
  MOE_CHECK_SHAPE(out, in.rows, in.cols, "copy out");
  for (int64_t i = 0; i < in.rows; ++i)
    std::memcpy(out.row(i), in.row(i), static_cast<size_t>(in.cols) * sizeof(float));
}

void add(ConstView a, ConstView b, View y) {
  MOE_CHECK_SHAPE(a, y.rows, y.cols, "add a");
  MOE_CHECK_SHAPE(b, y.rows, y.cols, "add b");
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < y.rows; ++i) {
    const float* pa = a.row(i);
    const float* pb = b.row(i);
    float* py = y.row(i);
    for (int64_t j = 0; j < y.cols; ++j) py[j] = pa[j] + pb[j];
  }
}

double max_rel_error(ConstView a, ConstView b, double floor) {
  MOE_CHECK_SHAPE(a, b.rows, b.cols, "max_rel_error a");
  double diff = 0.0, scale = floor;
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) {
      double x = a(i, j), y = b(i, j);
      double e = std::abs(x - y);
      if (!(e <= diff)) diff = e;  // NaN propagates as the worst
      scale = std::max(scale, std::abs(y));
    }
  return diff / scale;
}

}  // namespace moe
