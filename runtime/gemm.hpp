// File: gemm.hpp — single-precision GEMM on views; the only place that calls BLIS.
//
//   C = alpha * op(A) * op(B) + beta * C,   op(X) = X or X^T
// with op(A) [m, k], op(B) [k, n], C [m, n]. Views may be strided (ld >= cols). Shapes are
// checked and a mismatch throws an Error naming both shapes. beta = 0 ignores C's old contents
// (NaNs included). Thread use follows runtime/threads.hpp: one BLIS thread when called inside an
// OpenMP parallel region, the policy's BLIS thread count otherwise.
#pragma once

#include <vector>

#include "runtime/tensor.hpp"

namespace moe {

enum class Trans { kNo, kYes };

void gemm(Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta, View c);

// Same contract with an explicit BLIS thread count for this call (1 inside per-expert loops).
void gemm_threads(int n_threads, Trans ta, Trans tb, float alpha, ConstView a, ConstView b,
                  float beta, View c);

// B [k, n] packed once for gemm_packed, for weights that stay fixed over many products
// (inference): column panels of kPackWidth columns, each stored row by row
// ([ceil(n / kPackWidth)][k][kPackWidth], the last panel zero-padded). A product with few rows
// then streams B once, contiguously; BLIS reads an unpacked B for small products, walking each
// column block down rows ld floats apart, which maps every row onto the same few L1 sets.
constexpr int64_t kPackWidth = 32;
struct PackedB {
  int64_t k = 0, n = 0;
  std::vector<float> data;
};
void pack_b(ConstView b, PackedB& out);

// C [m, n] = A [m, k] B (beta = 0, no transposes). Each element of C is a chain of fused
// multiply-adds over p = 0 .. k-1 in order, from 0: a row's result does not depend on m or on
// the other rows. Serial (call it from parallel loops); vector code in GCC's generic vectors.
void gemm_packed(ConstView a, const PackedB& b, View c);

// Plain triple loop in double accumulation: the tests' reference.
void gemm_reference(Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta, View c);

// BLIS's version string, for start-up banners and benchmark output.
const char* blis_version();

}  // namespace moe
