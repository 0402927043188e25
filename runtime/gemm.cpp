#include "runtime/gemm.hpp"

#include <blis.h>

#include <algorithm>
#include <cstring>

#include "runtime/threads.hpp"

namespace moe {

namespace {

struct GemmDims {
  int64_t m, n, k;
};

GemmDims check_dims(Trans ta, Trans tb, ConstView a, ConstView b, View c) {
  int64_t am = ta == Trans::kNo ? a.rows : a.cols;
  int64_t ak = ta == Trans::kNo ? a.cols : a.rows;
  int64_t bk = tb == Trans::kNo ? b.rows : b.cols;
  int64_t bn = tb == Trans::kNo ? b.cols : b.rows;
  if (ak != bk || c.rows != am || c.cols != bn)  // can_mul_mat
    throw Error(ErrorKind::kInternal,
                cat("gemm: op(A) [", am, ", ", ak, "] x op(B) [", bk, ", ", bn, "] -> C [", c.rows,
                    ", ", c.cols, "]: shapes do not match"));
  return {am, bn, ak};
}

void run_blis(int n_threads, Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta,
              View c) {
  GemmDims d = check_dims(ta, tb, a, b, c);
  if (d.m == 0 || d.n == 0) return;
  if (d.k == 0) {
    // BLIS handles k = 0 as C = beta C; do it here so beta = 0 also clears NaNs.
    for (int64_t i = 0; i < c.rows; ++i)
      for (int64_t j = 0; j < c.cols; ++j) c(i, j) = beta == 0.0f ? 0.0f : beta * c(i, j);
    return;
  }
  rntm_t rntm = BLIS_RNTM_INITIALIZER;
  bli_rntm_set_num_threads(n_threads, &rntm);
  // Row-major views: row stride ld, column stride 1. Views with one row may have ld < cols in
  // callers' arithmetic; BLIS wants a consistent stride, so use cols there.
  auto lda = a.rows <= 1 ? a.cols : a.ld;
  auto ldb = b.rows <= 1 ? b.cols : b.ld;
  auto ldc = c.rows <= 1 ? c.cols : c.ld;
  float alpha_ = alpha, beta_ = beta;
  bli_sgemm_ex(ta == Trans::kNo ? BLIS_NO_TRANSPOSE : BLIS_TRANSPOSE,
               tb == Trans::kNo ? BLIS_NO_TRANSPOSE : BLIS_TRANSPOSE, d.m, d.n, d.k, &alpha_,
               const_cast<float*>(a.data), lda, 1, const_cast<float*>(b.data), ldb, 1, &beta_,
               c.data, ldc, 1, nullptr, &rntm);
}

// Packed GEMM: kMr rows x one panel (2 vectors of 16) of C in registers, over all of k.
typedef float Vec16 __attribute__((vector_size(64)));
typedef uint32_t Word16 __attribute__((vector_size(64)));
constexpr int kMaxRows = 8;
static_assert(kPackWidth == 32, "the packed kernel holds a panel in two 16-float vectors");
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bf16 panels pair values in 32-bit words");

// One panel row (32 values) as two fp32 vectors, columns 0-15 and 16-31. Out parameters, not
// return values: returning a 64-byte vector changes the ABI without AVX-512 (MOE_NATIVE=OFF).
inline void load_row(const float* row, Vec16& b0, Vec16& b1) {
  std::memcpy(&b0, row, sizeof(Vec16));
  std::memcpy(&b1, row + 16, sizeof(Vec16));
}
// A bf16 row holds the columns in pairs (bf16_slot): 32-bit word i is column i in its low half
// and column 16 + i in its high half. Widening is exact and costs one load and two bit
// operations per row: shift column i into the upper half (the lower half zero), and mask
// column 16 + i where it already is.
inline void load_row(const uint16_t* row, Vec16& b0, Vec16& b1) {
  Word16 w;
  std::memcpy(&w, row, sizeof(Word16));
  const Word16 lo = w << 16, hi = w & 0xffff0000u;
  std::memcpy(&b0, &lo, sizeof(Vec16));
  std::memcpy(&b1, &hi, sizeof(Vec16));
}
// Where column j (0-31) of a panel row sits: fp32 in order, bf16 paired as load_row reads it.
constexpr int64_t fp32_slot(int64_t j) {
  return j;
}
constexpr int64_t bf16_slot(int64_t j) {
  return j < 16 ? 2 * j : 2 * (j - 16) + 1;
}

// One kernel body for both panel types: the same FMA chain, whatever B is stored in.
template <int kMr, typename T>
void packed_panel(int64_t k, const float* a, int64_t lda, const T* panel, float* c, int64_t ldc,
                  int64_t width) {
  Vec16 acc0[kMr], acc1[kMr];
  for (int i = 0; i < kMr; ++i) acc0[i] = acc1[i] = Vec16{};
  for (int64_t p = 0; p < k; ++p) {
    Vec16 b0, b1;
    load_row(panel + p * kPackWidth, b0, b1);
    for (int i = 0; i < kMr; ++i) {
      const float s = a[i * lda + p];
      acc0[i] += s * b0;
      acc1[i] += s * b1;
    }
  }
  for (int i = 0; i < kMr; ++i) {
    if (width == kPackWidth) {
      std::memcpy(c + i * ldc, &acc0[i], sizeof(Vec16));
      std::memcpy(c + i * ldc + 16, &acc1[i], sizeof(Vec16));
    } else {
      float row[kPackWidth];
      std::memcpy(row, &acc0[i], sizeof(Vec16));
      std::memcpy(row + 16, &acc1[i], sizeof(Vec16));
      std::memcpy(c + i * ldc, row, static_cast<size_t>(width) * sizeof(float));
    }
  }
}

template <typename T>
using PanelKernel = void (*)(int64_t, const float*, int64_t, const T*, float*, int64_t, int64_t);
template <typename T>
constexpr PanelKernel<T> kPanelKernels[kMaxRows + 1] = {nullptr,
                                                        packed_panel<1, T>,
                                                        packed_panel<2, T>,
                                                        packed_panel<3, T>,
                                                        packed_panel<4, T>,
                                                        packed_panel<5, T>,
                                                        packed_panel<6, T>,
                                                        packed_panel<7, T>,
                                                        packed_panel<8, T>};

// Panel by panel, all row blocks: the panel (k x 32 values) stays in cache across them.
template <typename T>
void run_packed(ConstView a, const T* data, int64_t k, int64_t n, View c) {
  for (int64_t j0 = 0; j0 < n; j0 += kPackWidth) {
    const T* panel = data + j0 * k;
    const int64_t w = std::min(kPackWidth, n - j0);
    for (int64_t i0 = 0; i0 < a.rows; i0 += kMaxRows) {
      const int64_t mr = std::min<int64_t>(kMaxRows, a.rows - i0);
      kPanelKernels<T>[mr](k, a.row(i0), a.ld, panel, c.row(i0) + j0, c.ld, w);
    }
  }
}

// b [k, n] into panels of T ([ceil(n / 32)][k][32], zero-padded), each value through convert,
// column j of a panel row at slot(j).
template <typename T, typename Convert>
void pack_panels(ConstView b, std::vector<T>& out, Convert convert, int64_t (*slot)(int64_t)) {
  const int64_t panels = (b.cols + kPackWidth - 1) / kPackWidth;
  out.assign(static_cast<size_t>(panels * b.rows * kPackWidth), T{});
  for (int64_t q = 0; q < panels; ++q) {
    const int64_t j0 = q * kPackWidth, w = std::min(kPackWidth, b.cols - j0);
    T* panel = out.data() + q * b.rows * kPackWidth;
    for (int64_t p = 0; p < b.rows; ++p) {
      const float* src = b.row(p) + j0;
      for (int64_t j = 0; j < w; ++j) panel[p * kPackWidth + slot(j)] = convert(src[j]);
    }
  }
}

}  // namespace

WeightType parse_weight_type(const std::string& name) {
  if (name == "fp32") return WeightType::kFp32;
  if (name == "bf16") return WeightType::kBf16;
  throw Error(ErrorKind::kConfig, cat("weights '", name, "': expected fp32 or bf16"));
}

const char* weight_type_name(WeightType t) {
  return t == WeightType::kBf16 ? "bf16" : "fp32";
}

uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN: keep the sign, force a quiet mantissa bit
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  // Round to nearest, ties to even: add just under half an ulp of bf16, plus the lowest kept
  // bit (so exact halves round up only from odd). Carries run into the exponent, which is
  // right: the largest values round to Inf, Inf stays Inf.
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

void round_to_bf16(View b) {
  for (int64_t i = 0; i < b.rows; ++i) {
    float* r = b.row(i);
    for (int64_t j = 0; j < b.cols; ++j) r[j] = bf16_to_float(float_to_bf16(r[j]));
  }
}

void pack_b(ConstView b, PackedB& out) {
  out.k = b.rows;
  out.n = b.cols;
  out.type = WeightType::kFp32;
  out.bf16.clear();
  out.bf16.shrink_to_fit();
  pack_panels(
      b, out.data, [](float x) { return x; }, fp32_slot);
}

void pack_b_bf16(ConstView b, PackedB& out) {
  out.k = b.rows;
  out.n = b.cols;
  out.type = WeightType::kBf16;
  out.data.clear();
  out.data.shrink_to_fit();
  pack_panels(b, out.bf16, float_to_bf16, bf16_slot);
}

void gemm_packed(ConstView a, const PackedB& b, View c) {
  if (a.cols != b.k || c.rows != a.rows || c.cols != b.n)
    throw Error(ErrorKind::kInternal,
                cat("gemm_packed: A [", a.rows, ", ", a.cols, "] x B [", b.k, ", ", b.n, "] -> C [",
                    c.rows, ", ", c.cols, "]: shapes do not match"));
  if (b.type == WeightType::kBf16)
    run_packed(a, b.bf16.data(), b.k, b.n, c);
  else
    run_packed(a, b.data.data(), b.k, b.n, c);
}

void gemm(Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta, View c) {
  int n = in_parallel_region() ? 1 : thread_policy().blis_threads;
  run_blis(n, ta, tb, alpha, a, b, beta, c);
}

void gemm_threads(int n_threads, Trans ta, Trans tb, float alpha, ConstView a, ConstView b,
                  float beta, View c) {
  run_blis(n_threads < 1 ? 1 : n_threads, ta, tb, alpha, a, b, beta, c);
}

void gemm_reference(Trans ta, Trans tb, float alpha, ConstView a, ConstView b, float beta, View c) {
  GemmDims d = check_dims(ta, tb, a, b, c);
  for (int64_t i = 0; i < d.m; ++i)
    for (int64_t j = 0; j < d.n; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < d.k; ++p) {
        double x = ta == Trans::kNo ? a(i, p) : a(p, i);
        double y = tb == Trans::kNo ? b(p, j) : b(j, p);
        s += x * y;
      }
      double old = beta == 0.0f ? 0.0 : static_cast<double>(beta) * c(i, j);
      c(i, j) = static_cast<float>(alpha * s + old);
    }
}

const char* blis_version() {
  return bli_info_get_version_str();
}

}  // namespace moe
