// File: tensor.hpp — owning fp32 tensors and borrowed row-major matrix views.
//
// Tensor owns a 64-byte-aligned fp32 buffer with a shape of up to 4 dimensions. View/ConstView
// borrow a 2-D row-major window (ptr, rows, cols, ld) of any buffer; they are passed by value and
// never copy. A Tensor of shape [a, b, c] is seen as a matrix [a*b, c] by view(), and
// slab(i) gives the i-th [b, c] matrix of its leading dimension (one expert's weights, say).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "runtime/error.hpp"

namespace moe {

struct ConstView;

// A mutable row-major matrix view: element (i, j) is data[i * ld + j].
struct View {
  float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;  // row stride in elements, >= cols

  View() = default;
  View(float* d, int64_t r, int64_t c) : data(d), rows(r), cols(c), ld(c) {}
  View(float* d, int64_t r, int64_t c, int64_t l) : data(d), rows(r), cols(c), ld(l) {}

  float& operator()(int64_t i, int64_t j) const { return data[i * ld + j]; }
  float* row(int64_t i) const { return data + i * ld; }
  // Rows [begin, begin + n).
  View row_range(int64_t begin, int64_t n) const { return View(data + begin * ld, n, cols, ld); }
  // Columns [begin, begin + n) of every row.
  View col_range(int64_t begin, int64_t n) const { return View(data + begin, rows, n, ld); }
  bool contiguous() const { return ld == cols || rows <= 1; }
  int64_t size() const { return rows * cols; }
  void fill(float v) const;
};

// A read-only row-major matrix view.
struct ConstView {
  const float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;

  ConstView() = default;
  ConstView(const float* d, int64_t r, int64_t c) : data(d), rows(r), cols(c), ld(c) {}
  ConstView(const float* d, int64_t r, int64_t c, int64_t l) : data(d), rows(r), cols(c), ld(l) {}
  ConstView(const View& v) : data(v.data), rows(v.rows), cols(v.cols), ld(v.ld) {}  // NOLINT

  const float& operator()(int64_t i, int64_t j) const { return data[i * ld + j]; }
  const float* row(int64_t i) const { return data + i * ld; }
  ConstView row_range(int64_t begin, int64_t n) const {
    return ConstView(data + begin * ld, n, cols, ld);
  }
  ConstView col_range(int64_t begin, int64_t n) const {
    return ConstView(data + begin, rows, n, ld);
  }
  bool contiguous() const { return ld == cols || rows <= 1; }
  int64_t size() const { return rows * cols; }
};

// An owning, 64-byte-aligned fp32 tensor of rank 1..4. Move-only: copies are explicit (clone()).
class Tensor {
 public:
  static constexpr int kMaxRank = 4;
  static constexpr size_t kAlignment = 64;

  Tensor() = default;
  explicit Tensor(std::initializer_list<int64_t> shape);
  ~Tensor();
  Tensor(Tensor&& other) noexcept;
  Tensor& operator=(Tensor&& other) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  // Zero-filled tensor of the given shape.
  static Tensor zeros(std::initializer_list<int64_t> shape) { return Tensor(shape); }
  Tensor clone() const;

  // Reallocates only when the element count grows; contents are unspecified afterwards unless
  // the size is unchanged. Used for per-step buffers that are reused across steps.
  void resize(std::initializer_list<int64_t> shape);

  int rank() const { return rank_; }
  int64_t dim(int i) const;
  int64_t numel() const { return numel_; }
  const std::array<int64_t, kMaxRank>& shape() const { return shape_; }
  std::string shape_string() const;
  float* data() { return data_; }
  const float* data() const { return data_; }
  float& operator[](int64_t i) { return data_[i]; }
  const float& operator[](int64_t i) const { return data_[i]; }

  // The tensor as a matrix [numel / last_dim, last_dim].
  View view();
  ConstView view() const;
  // The i-th matrix of the leading dimension: shape [dim(1) * ... , last_dim].
  View slab(int64_t i);
  ConstView slab(int64_t i) const;

  void fill(float v);
  void zero() { fill(0.0f); }

 private:
  void allocate(std::initializer_list<int64_t> shape);
  float* data_ = nullptr;
  int64_t numel_ = 0;
  int64_t capacity_ = 0;
  int rank_ = 0;
  std::array<int64_t, kMaxRank> shape_{};
};

// Bytes held by all live Tensor buffers of this process, and the most ever held at once (for the
// memory breakdown of a run). Thread-safe.
int64_t tensor_bytes_live();
int64_t tensor_bytes_peak();

// out = in (shapes must match); the one explicit copy helper.
void copy(ConstView in, View out);

// y = a + b element by element (shapes must match; y may be a or b), rows over the OpenMP
// threads; add_into(y, b) is y += b.
void add(ConstView a, ConstView b, View y);
inline void add_into(View y, ConstView b) {
  add(y, b, y);
}

// max |a - b| / max(max |b|, floor): the normwise relative error the tests state tolerances in.
double max_rel_error(ConstView a, ConstView b, double floor = 1e-6);

}  // namespace moe
