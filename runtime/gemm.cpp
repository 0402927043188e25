#include "runtime/gemm.hpp"

#include <blis.h>

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

}  // namespace

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
