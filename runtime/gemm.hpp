// File: gemm.hpp — single-precision GEMM on views; the only place that calls BLIS.
//
//   C = alpha * op(A) * op(B) + beta * C,   op(X) = X or X^T
// with op(A) [m, k], op(B) [k, n], C [m, n]. Views may be strided (ld >= cols). Shapes are
// checked and a mismatch throws an Error naming both shapes. beta = 0 ignores C's old contents
// (NaNs included). Thread use follows runtime/threads.hpp: one BLIS thread when called inside an
// OpenMP parallel region, the policy's BLIS thread count otherwise.
#pragma once

#include <cstdint>
#include <string>
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
//
// The panels hold fp32 (pack_b) or bfloat16 (pack_b_bf16: weight-only bf16, half the bytes a
// memory-bound product streams). bf16 is the upper half of an fp32: 1 sign, 8 exponent and 7
// mantissa bits, so it converts to fp32 exactly.
constexpr int64_t kPackWidth = 32;
enum class WeightType { kFp32, kBf16 };
WeightType parse_weight_type(const std::string& name);  // "fp32" | "bf16"; else a kConfig Error
const char* weight_type_name(WeightType t);

struct PackedB {
  int64_t k = 0, n = 0;
  WeightType type = WeightType::kFp32;
  std::vector<float> data;     // kFp32: [ceil(n / 32)][k][32]
  std::vector<uint16_t> bf16;  // kBf16: the same panels, bf16 bit patterns; within a panel
                               // row, columns i and 16 + i side by side (i = 0 .. 15)
  bool empty() const { return data.empty() && bf16.empty(); }
  int64_t bytes() const {
    return static_cast<int64_t>(data.size() * sizeof(float) + bf16.size() * sizeof(uint16_t));
  }
};
void pack_b(ConstView b, PackedB& out);
// The same panels in bf16, each value rounded to nearest, ties to even (float_to_bf16).
void pack_b_bf16(ConstView b, PackedB& out);

// fp32 -> bf16 bits, round to nearest even; +-Inf stay Inf, finite values past the largest
// bf16 round to Inf, NaN stays a (quiet) NaN of the same sign.
uint16_t float_to_bf16(float x);
float bf16_to_float(uint16_t h);  // exact
// Rounds every element of b to the nearest bf16 value, in place (stored as fp32).
void round_to_bf16(View b);

// C [m, n] = A [m, k] B (beta = 0, no transposes). Each element of C is a chain of fused
// multiply-adds over p = 0 .. k-1 in order, from 0: a row's result does not depend on m or on
// the other rows. Serial (call it from parallel loops); vector code in GCC's generic vectors.
// A bf16 B is widened to fp32 as it is loaded and then takes exactly the fp32 kernel's chain,
// so gemm_packed(A, pack_b_bf16(W)) equals gemm_packed(A, pack_b(W rounded by round_to_bf16))
// bit for bit.
void gemm_packed(ConstView a, const PackedB& b, View c);

// Plain triple loop in double accumulation: the tests' reference.
void gemm_reference(Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta, View c);

// BLIS's version string, for start-up banners and benchmark output.
const char* blis_version();

}  // namespace moe
