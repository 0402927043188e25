// File: product_key.cpp — product-key top-k retrieval; see product_key.hpp.
#include "model/routers/product_key.hpp"

#include <algorithm>
#include <numeric>

#include "runtime/error.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {
namespace {

// True when (sa, ia) ranks before (sb, ib): higher score first, then smaller index.
inline bool before(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// The k best of s[0..n) into (idx, val), sorted (insertion into a sorted array of k: k is small).
void topk_row(const float* s, int64_t n, int k, int32_t* idx, float* val) {
  int filled = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = s[i];
    if (filled == k && !before(v, i, val[k - 1], idx[k - 1])) continue;
    int pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && before(v, i, val[pos - 1], idx[pos - 1])) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = static_cast<int32_t>(i);
  }
}

}  // namespace

void product_key_topk(ConstView q, ConstView c1, ConstView c2, int k, ProductKeyScratch& scratch,
                      int32_t* ids, float* scores) {
  const int64_t M = q.rows, n = c1.rows, h = c1.cols;
  MOE_CHECK(q.cols == 2 * h && c2.rows == n && c2.cols == h, "product_key_topk: q [", q.rows, ", ",
            q.cols, "] does not match sub-keys [", n, ", ", h, "] x 2");
  MOE_CHECK(k >= 1 && k <= n, "product_key_topk: k = ", k, " outside [1, n = ", n, "]");
  if (M == 0) return;
  scratch.s1.resize({M, n});
  scratch.s2.resize({M, n});
  View s1 = scratch.s1.view(), s2 = scratch.s2.view();
  gemm(Trans::kNo, Trans::kYes, 1.0f, q.col_range(0, h), c1, 0.0f, s1);
  gemm(Trans::kNo, Trans::kYes, 1.0f, q.col_range(h, h), c2, 0.0f, s2);
#pragma omp parallel
  {
    const size_t kk = static_cast<size_t>(k);
    std::vector<int32_t> i1(kk), i2(kk), cand_id(kk);
    std::vector<float> v1(kk), v2(kk), cand(kk * kk);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      topk_row(s1.row(m), n, k, i1.data(), v1.data());
      topk_row(s2.row(m), n, k, i2.data(), v2.data());
      // The k^2 candidate sums; best k of them, ties by smaller expert id i * n + j.
      int32_t* out_id = ids + m * k;
      float* out_s = scores + m * k;
      int filled = 0;
      for (int a = 0; a < k; ++a)
        for (int b = 0; b < k; ++b) {
          const float v = v1[static_cast<size_t>(a)] + v2[static_cast<size_t>(b)];
          const int32_t id =
              static_cast<int32_t>(i1[static_cast<size_t>(a)] * n + i2[static_cast<size_t>(b)]);
          if (filled == k && !before(v, id, out_s[k - 1], out_id[k - 1])) continue;
          int pos = filled < k ? filled++ : k - 1;
          while (pos > 0 && before(v, id, out_s[pos - 1], out_id[pos - 1])) {
            out_s[pos] = out_s[pos - 1];
            out_id[pos] = out_id[pos - 1];
            --pos;
          }
          out_s[pos] = v;
          out_id[pos] = id;
        }
    }
  }
}

void product_key_brute_force(ConstView q, ConstView c1, ConstView c2, int k,
                             std::vector<int32_t>& ids, std::vector<float>& scores) {
  const int64_t M = q.rows, n = c1.rows, h = c1.cols, N = n * n;
  ids.assign(static_cast<size_t>(M * k), -1);
  scores.assign(static_cast<size_t>(M * k), 0.0f);
  std::vector<double> all(static_cast<size_t>(N));
  std::vector<int32_t> order(static_cast<size_t>(N));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t c = 0; c < h; ++c) s += double(q(m, c)) * c1(i, c);
        for (int64_t c = 0; c < h; ++c) s += double(q(m, h + c)) * c2(j, c);
        all[static_cast<size_t>(i * n + j)] = s;
      }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      const double sa = all[static_cast<size_t>(a)], sb = all[static_cast<size_t>(b)];
      return sa > sb || (sa == sb && a < b);
    });
    for (int j = 0; j < k; ++j) {
      ids[static_cast<size_t>(m * k + j)] = order[static_cast<size_t>(j)];
      scores[static_cast<size_t>(m * k + j)] =
          static_cast<float>(all[static_cast<size_t>(order[static_cast<size_t>(j)])]);
    }
  }
}

}  // namespace moe::model
