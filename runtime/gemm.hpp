// File: gemm.hpp — single-precision GEMM on views; the only place that calls BLIS.
//
//   C = alpha * op(A) * op(B) + beta * C,   op(X) = X or X^T
// with op(A) [m, k], op(B) [k, n], C [m, n]. Views may be strided (ld >= cols). Shapes are
// checked and a mismatch throws an Error naming both shapes. beta = 0 ignores C's old contents
// (NaNs included). Thread use follows runtime/threads.hpp: one BLIS thread when called inside an
// OpenMP parallel region, the policy's BLIS thread count otherwise.
#pragma once

#include "runtime/tensor.hpp"

namespace moe {

enum class Trans { kNo, kYes };

void gemm(Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta, View c);

// Same contract with an explicit BLIS thread count for this call (1 inside per-expert loops).
void gemm_threads(int n_threads, Trans ta, Trans tb, float alpha, ConstView a, ConstView b,
                  float beta, View c);

// Plain triple loop in double accumulation: the tests' reference.
void gemm_reference(Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta, View c);

// BLIS's version string, for start-up banners and benchmark output.
const char* blis_version();

}  // namespace moe
