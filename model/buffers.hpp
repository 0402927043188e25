// File: buffers.hpp — grow-only scratch matrices, so per-step buffers are allocated once.
#pragma once

#include "runtime/tensor.hpp"

namespace moe::model {

// A [rows, cols] view of buf, growing buf only when it is too small (contents unspecified).
inline View scratch(Tensor& buf, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  if (buf.numel() < n) buf.resize({n});
  return View(buf.data(), rows, cols);
}

}  // namespace moe::model
