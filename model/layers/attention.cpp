#include "model/layers/attention.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/buffers.hpp"
#include "model/layers/activation.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

namespace {

constexpr int64_t kColBlock = 16;  // columns per bias-gradient task

// db[j] += sum_i dy[i, j], in row order, parallel over column blocks.
void add_column_sums(ConstView dy, float* db) {
  const int64_t n_blocks = (dy.cols + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t c0 = b * kColBlock, nc = std::min(kColBlock, dy.cols - c0);
    for (int64_t i = 0; i < dy.rows; ++i) {
      const float* r = dy.row(i) + c0;
      for (int64_t j = 0; j < nc; ++j) db[c0 + j] += r[j];
    }
  }
}

// y[i, :] += b for every row.
void add_bias(View y, const float* b) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < y.rows; ++i) {
    float* r = y.row(i);
#pragma omp simd
    for (int64_t j = 0; j < y.cols; ++j) r[j] += b[j];
  }
}

}  // namespace

// --- Rope ---------------------------------------------------------------------------------

Rope::Rope(int64_t d_head, double base) : dh_(d_head), base_(base) {
  MOE_CHECK(dh_ >= 2 && dh_ % 2 == 0, "rope: head width ", dh_, " must be even");
  MOE_CHECK(base_ > 1.0, "rope: base ", base_);
}

void Rope::prepare(int64_t pos0, int64_t n_pos) {
  if (pos0 == pos0_ && n_pos <= n_pos_) return;
  const int64_t half = dh_ / 2;
  View c = scratch(cos_, n_pos, half), s = scratch(sin_, n_pos, half);
  for (int64_t i = 0; i < half; ++i) {
    const double inv_freq = std::pow(base_, -2.0 * static_cast<double>(i) / double(dh_));
    for (int64_t t = 0; t < n_pos; ++t) {
      const double angle = static_cast<double>(pos0 + t) * inv_freq;
      c(t, i) = static_cast<float>(std::cos(angle));
      s(t, i) = static_cast<float>(std::sin(angle));
    }
  }
  pos0_ = pos0;
  n_pos_ = n_pos;
}

// Rotates rows of x by the angles of table rows [first, first + x.rows); sign -1 is the
// transpose (inverse) rotation.
void Rope::rotate(View x, int64_t first, float sign) const {
  const int64_t half = dh_ / 2;
  for (int64_t t = 0; t < x.rows; ++t) {
    float* a = x.row(t);
    float* b = a + half;
    const float* c = cos_.data() + (first + t) * half;
    const float* s = sin_.data() + (first + t) * half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float ai = a[i], bi = b[i], si = sign * s[i];
      a[i] = ai * c[i] - bi * si;
      b[i] = ai * si + bi * c[i];
    }
  }
}

void Rope::apply(View x) const {
  MOE_CHECK(x.cols == dh_ && x.rows <= n_pos_, "rope.apply: [", x.rows, ", ", x.cols,
            "] with tables for ", n_pos_, " positions of width ", dh_);
  rotate(x, 0, 1.0f);
}

void Rope::apply_transpose(View x) const {
  MOE_CHECK(x.cols == dh_ && x.rows <= n_pos_, "rope.apply_transpose: [", x.rows, ", ", x.cols,
            "] with tables for ", n_pos_, " positions of width ", dh_);
  rotate(x, 0, -1.0f);
}

void Rope::apply_at(View x, int64_t first) const {
  MOE_CHECK(pos0_ == 0 && x.cols == dh_ && first >= 0 && first + x.rows <= n_pos_,
            "rope.apply_at: positions [", first, ", ", first + x.rows, ") of width ", x.cols,
            " with tables for ", n_pos_, " positions from ", pos0_, " of width ", dh_);
  rotate(x, first, 1.0f);
}

int64_t stack_cached_rows(const std::string& layer, int64_t d, std::span<const int64_t> n_new,
                          std::span<KvCache* const> caches, std::vector<int64_t>& row0) {
  MOE_CHECK_EQ(n_new.size(), caches.size(), cat(layer, ".forward_cached: sequences"));
  const size_t B = n_new.size();
  row0.assign(B + 1, 0);
  int64_t max_end = 0;
  for (size_t b = 0; b < B; ++b) {
    const KvCache& c = *caches[b];
    const int64_t nb = n_new[b];
    MOE_CHECK(nb >= 1 && c.d == d && c.len + nb <= c.capacity(), layer,
              ".forward_cached: sequence ", b, " appends ", nb, " tokens to a cache of ", c.len,
              "/", c.capacity(), " positions of width ", c.d);
    row0[b + 1] = row0[b] + nb;
    max_end = std::max(max_end, c.capacity());
  }
  return max_end;
}

KvCache::KvCache(int64_t capacity, int64_t d_model)
    : k({std::max<int64_t>(capacity, 1), d_model}),
      v({std::max<int64_t>(capacity, 1), d_model}),
      cap(capacity),
      d(d_model) {
  MOE_CHECK(capacity >= 1 && d_model >= 1, "kv cache: capacity ", capacity, ", d ", d_model);
}

// --- Attention ----------------------------------------------------------------------------

namespace {
// The head width, after checking that the heads divide d into even widths (RoPE pairs).
int64_t checked_head_width(const std::string& name, int64_t d, int64_t h) {
  if (h < 1 || d % h != 0 || (d / h) % 2 != 0)
    throw Error(ErrorKind::kConfig, cat(name, ": d_model ", d, " must be a multiple of n_heads ", h,
                                        " with an even head width (RoPE pairs)"));
  return d / h;
}
}  // namespace

Attention::Attention(std::string name, int64_t d_model, const AttentionConfig& config,
                     uint64_t seed)
    : name_(std::move(name)),
      d_(d_model),
      h_(config.n_heads),
      dh_(checked_head_width(name_, d_model, config.n_heads)),
      tile_(config.query_tile),
      bias_(config.bias),
      rope_(dh_, config.rope_base),
      rope_decode_(dh_, config.rope_base) {
  MOE_CHECK(tile_ >= 1, name_, ": query_tile ", tile_);
  w_qkv_ = Tensor({d_, 3 * d_});
  dw_qkv_ = Tensor({d_, 3 * d_});
  w_o_ = Tensor({d_, d_});
  dw_o_ = Tensor({d_, d_});
  const float bound = 1.0f / std::sqrt(static_cast<float>(d_));
  init_uniform(w_qkv_.view(), bound, seed, init_stream((name_ + ".w_qkv").c_str(), 0));
  init_uniform(w_o_.view(), bound, seed, init_stream((name_ + ".w_o").c_str(), 0));
  if (bias_) {
    b_qkv_ = Tensor({1, 3 * d_});
    db_qkv_ = Tensor({1, 3 * d_});
    b_o_ = Tensor({1, d_});
    db_o_ = Tensor({1, d_});
  }
  dp_.resize(static_cast<size_t>(std::max(1, omp_get_max_threads())));
  scores_.resize(dp_.size());
}

std::vector<ParamRef> Attention::params() {
  std::vector<ParamRef> out = {{name_ + ".w_qkv", w_qkv_.view(), dw_qkv_.view()},
                               {name_ + ".w_o", w_o_.view(), dw_o_.view()}};
  if (bias_) {
    out.push_back({name_ + ".b_qkv", b_qkv_.view(), db_qkv_.view()});
    out.push_back({name_ + ".b_o", b_o_.view(), db_o_.view()});
  }
  return out;
}

void Attention::zero_grad() {
  dw_qkv_.zero();
  dw_o_.zero();
  if (bias_) {
    db_qkv_.zero();
    db_o_.zero();
  }
}

void Attention::plan_tiles(int64_t T) {
  tile_off_.assign(1, 0);
  for (int64_t r0 = 0; r0 < T; r0 += tile_) {
    const int64_t e = std::min(T, r0 + tile_);
    tile_off_.push_back(tile_off_.back() + (e - r0) * e);
  }
}

Tensor Attention::probs(int64_t b, int64_t h) const {
  MOE_CHECK(b >= 0 && b < n_seq_ && h >= 0 && h < h_, name_, ".probs(", b, ", ", h, ")");
  Tensor out({std::max<int64_t>(t_, 1), std::max<int64_t>(t_, 1)});
  const float* base = probs_.data() + (b * h_ + h) * tile_off_.back();
  for (size_t i = 0; i + 1 < tile_off_.size(); ++i) {
    const int64_t r0 = static_cast<int64_t>(i) * tile_, e = std::min(t_, r0 + tile_);
    for (int64_t t = r0; t < e; ++t)
      std::copy_n(base + tile_off_[i] + (t - r0) * e, e, out.data() + t * t_);
  }
  return out;
}

void Attention::forward(ConstView x, int64_t n_seq, View y, int64_t pos0) {
  // n_seq = 0 with no rows is a rank with no tokens (e.g. a generation step served elsewhere).
  MOE_CHECK(n_seq >= 0 && (n_seq == 0 ? x.rows == 0 : x.rows % n_seq == 0), name_,
            ".forward: ", x.rows, " rows are not n_seq ", n_seq, " sequences of equal length");
  const int64_t n = x.rows, T = n_seq ? n / n_seq : 0, d = d_, H = h_, dh = dh_;
  MOE_CHECK_SHAPE(x, n, d, cat(name_, ".forward x"));
  MOE_CHECK_SHAPE(y, n, d, cat(name_, ".forward y"));
  MOE_CHECK(pos0 >= 0, name_, ".forward: pos0 ", pos0);
  x_ = x;
  n_seq_ = n_seq;
  t_ = T;
  if (n == 0) return;
  View qkv = scratch(qkv_, n, 3 * d);
  View att = scratch(att_, n, d);
  plan_tiles(T);
  const int64_t pair_floats = tile_off_.back();
  float* probs = scratch(probs_, n_seq * H, pair_floats).data;
  rope_.prepare(pos0, T);

  gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_qkv_.view(), 0.0f, qkv);
  if (bias_) add_bias(qkv, b_qkv_.data());

  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const int64_t n_pairs = n_seq * H;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t b = p / H, h = p % H;
    View rows = qkv.row_range(b * T, T);
    View q = rows.col_range(h * dh, dh), k = rows.col_range(d + h * dh, dh);
    ConstView v = rows.col_range(2 * d + h * dh, dh);
    rope_.apply(q);
    rope_.apply(k);
    View o = att.row_range(b * T, T).col_range(h * dh, dh);
    for (size_t i = 0; i + 1 < tile_off_.size(); ++i) {
      // Query rows [r0, e) see keys [0, e): only the blocks on or below the diagonal.
      const int64_t r0 = static_cast<int64_t>(i) * tile_, e = std::min(T, r0 + tile_);
      View s(probs + p * pair_floats + tile_off_[i], e - r0, e);
      gemm(Trans::kNo, Trans::kYes, scale, q.row_range(r0, e - r0), ConstView(k).row_range(0, e),
           0.0f, s);
      // Causal, stable softmax: row t sees columns 0..t; the rest become exact zeros.
      for (int64_t t = r0; t < e; ++t) act::softmax_causal_row(s.row(t - r0), t, e);
      gemm(Trans::kNo, Trans::kNo, 1.0f, s, v.row_range(0, e), 0.0f, o.row_range(r0, e - r0));
    }
  }

  gemm(Trans::kNo, Trans::kNo, 1.0f, att, w_o_.view(), 0.0f, y);
  if (bias_) add_bias(y, b_o_.data());
}

void Attention::forward_cached(ConstView x, std::span<const int64_t> n_new,
                               std::span<KvCache* const> caches, View y) {
  const int64_t B = static_cast<int64_t>(n_new.size()), d = d_, H = h_, dh = dh_;
  const int64_t max_end = stack_cached_rows(name_, d, n_new, caches, row0_);
  const int64_t n = row0_.back();
  MOE_CHECK_SHAPE(x, n, d, cat(name_, ".forward_cached x"));
  MOE_CHECK_SHAPE(y, n, d, cat(name_, ".forward_cached y"));
  if (n == 0) return;
  // Tables from position 0 for the longest cache, built once (serial, before the loop).
  if (rope_decode_.n_pos() < max_end) rope_decode_.prepare(0, max_end);
  View qkv = scratch(qkv_new_, n, 3 * d);
  View att = scratch(att_new_, n, d);
  if (packed_qkv_.empty())
    gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_qkv_.view(), 0.0f, qkv);
  else
    gemm_packed(x, packed_qkv_, qkv);
  if (bias_) add_bias(qkv, b_qkv_.data());
  if (scores_.size() < static_cast<size_t>(omp_get_max_threads()))
    scores_.resize(static_cast<size_t>(omp_get_max_threads()));

  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  // One task per sequence, all heads together: each cached row of keys (then values) is read
  // once, d floats in a row, so the cache streams in order. Per head, scores, the causal
  // softmax (as in forward(): new row t, position past + t, sees columns 0 .. past + t) and
  // the weighted sum of the values run in plain loops: a decode step's head is one query row
  // against the cache, 2 dh (past + 1) multiply-adds, less than a GEMM call's own overhead.
#pragma omp parallel
  {
    Tensor& s_buf = scores_[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      KvCache& c = *caches[static_cast<size_t>(b)];
      const int64_t nb = n_new[static_cast<size_t>(b)], past = c.len, total = past + nb;
      View rows = qkv.row_range(row0_[static_cast<size_t>(b)], nb);
      View ck(c.k.data(), c.capacity(), d), cv(c.v.data(), c.capacity(), d);
      for (int64_t h = 0; h < H; ++h) {
        View q = rows.col_range(h * dh, dh), k = rows.col_range(d + h * dh, dh);
        rope_decode_.apply_at(q, past);
        rope_decode_.apply_at(k, past);
      }
      for (int64_t t = 0; t < nb; ++t) {  // append the keys and values
        std::copy_n(rows.row(t) + d, d, ck.row(past + t));
        std::copy_n(rows.row(t) + 2 * d, d, cv.row(past + t));
      }
      View s = scratch(s_buf, H, total);  // [H, total] scores, then probabilities
      for (int64_t t = 0; t < nb; ++t) {
        const float* qt = rows.row(t);
        const int64_t last = past + t;
        for (int64_t j = 0; j <= last; ++j) {
          const float* kj = ck.row(j);
          for (int64_t h = 0; h < H; ++h) {
            const float* qh = qt + h * dh;
            const float* kh = kj + h * dh;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < dh; ++i) dot += qh[i] * kh[i];
            s(h, j) = scale * dot;
          }
        }
        // Causal, stable softmax as in forward(): new row t (position past + t) sees columns
        // 0 .. past + t.
        for (int64_t h = 0; h < H; ++h) act::softmax_causal_row(s.row(h), last, last + 1);
        float* o = att.row(row0_[static_cast<size_t>(b)] + t);
        std::fill_n(o, d, 0.0f);
        for (int64_t j = 0; j <= last; ++j) {
          const float* vj = cv.row(j);
          for (int64_t h = 0; h < H; ++h) {
            const float w = s(h, j);
            float* oh = o + h * dh;
            const float* vh = vj + h * dh;
#pragma omp simd
            for (int64_t i = 0; i < dh; ++i) oh[i] += w * vh[i];
          }
        }
      }
    }
  }
  for (int64_t b = 0; b < B; ++b)
    caches[static_cast<size_t>(b)]->len += n_new[static_cast<size_t>(b)];

  if (packed_o_.empty())
    gemm(Trans::kNo, Trans::kNo, 1.0f, att, w_o_.view(), 0.0f, y);
  else
    gemm_packed(att, packed_o_, y);
  if (bias_) add_bias(y, b_o_.data());
}

void Attention::pack_for_inference(WeightType weights) {
  if (weights == WeightType::kBf16) round_to_bf16();
  auto pack = weights == WeightType::kBf16 ? pack_b_bf16 : pack_b;
  pack(w_qkv_.view(), packed_qkv_);
  pack(w_o_.view(), packed_o_);
}

void Attention::round_to_bf16() {
  moe::round_to_bf16(w_qkv_.view());
  moe::round_to_bf16(w_o_.view());
}

void Attention::backward(ConstView dy, View dx) {
  const int64_t n = x_.rows, T = t_, d = d_, H = h_, dh = dh_;
  MOE_CHECK_SHAPE(dy, n, d, cat(name_, ".backward dy"));
  MOE_CHECK_SHAPE(dx, n, d, cat(name_, ".backward dx"));
  if (n == 0) return;
  ConstView qkv(qkv_.data(), n, 3 * d);
  ConstView att(att_.data(), n, d);
  View datt(att_.data(), n, d);  // over att, once dWo has read it
  View dqkv = scratch(dqkv_, n, 3 * d);
  float* probs = probs_.data();
  const int64_t pair_floats = tile_off_.back();
  if (dp_.size() < static_cast<size_t>(omp_get_max_threads()))
    dp_.resize(static_cast<size_t>(omp_get_max_threads()));

  // Output projection: dWo += att^T dy, dbo += colsum(dy), datt = dy Wo^T.
  gemm(Trans::kYes, Trans::kNo, 1.0f, att, dy, 1.0f, dw_o_.view());
  if (bias_) add_column_sums(dy, db_o_.data());
  gemm(Trans::kNo, Trans::kYes, 1.0f, dy, w_o_.view(), 0.0f, datt);

  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const int64_t n_pairs = n_seq_ * H;
#pragma omp parallel
  {
    Tensor& dp_buf = dp_[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < n_pairs; ++p) {
      const int64_t b = p / H, h = p % H;
      ConstView rows = qkv.row_range(b * T, T);
      ConstView q = rows.col_range(h * dh, dh), k = rows.col_range(d + h * dh, dh);
      ConstView v = rows.col_range(2 * d + h * dh, dh);
      ConstView dout = ConstView(datt).row_range(b * T, T).col_range(h * dh, dh);
      View drows = dqkv.row_range(b * T, T);
      View dq = drows.col_range(h * dh, dh), dk = drows.col_range(d + h * dh, dh);
      View dv = drows.col_range(2 * d + h * dh, dh);
      // Query tiles last to first: the last tile sees every key, so its dV and dk products
      // (beta 0) overwrite all T rows and the earlier tiles accumulate into their prefixes.
      for (size_t i = tile_off_.size() - 1; i-- > 0;) {
        const int64_t r0 = static_cast<int64_t>(i) * tile_, e = std::min(T, r0 + tile_);
        const int64_t nr = e - r0;
        const float beta = i + 2 == tile_off_.size() ? 0.0f : 1.0f;
        View pm(probs + p * pair_floats + tile_off_[i], nr, e);
        View dpm = scratch(dp_buf, nr, e);
        ConstView dout_i = dout.row_range(r0, nr);
        // dV = P^T dO;  dP = dO V^T.
        gemm(Trans::kYes, Trans::kNo, 1.0f, pm, dout_i, beta, dv.row_range(0, e));
        gemm(Trans::kNo, Trans::kYes, 1.0f, dout_i, v.row_range(0, e), 0.0f, dpm);
        // dS = P * (dP - rowsum(P * dP)), in place of P (zero above the diagonal stays zero).
        for (int64_t t = r0; t < e; ++t) {
          float* pr = pm.row(t - r0);
          const float* gr = dpm.row(t - r0);
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j <= t; ++j) dot += pr[j] * gr[j];
#pragma omp simd
          for (int64_t j = 0; j <= t; ++j) pr[j] = pr[j] * (gr[j] - dot);
        }
        // dq = scale dS k;  dk = scale dS^T q  (both for the rotated q, k).
        gemm(Trans::kNo, Trans::kNo, scale, pm, k.row_range(0, e), 0.0f, dq.row_range(r0, nr));
        gemm(Trans::kYes, Trans::kNo, scale, pm, q.row_range(r0, nr), beta, dk.row_range(0, e));
      }
      rope_.apply_transpose(dq);
      rope_.apply_transpose(dk);
    }
  }

  // QKV projection: dWqkv += x^T dqkv, dbqkv += colsum(dqkv), dx = dqkv Wqkv^T.
  gemm(Trans::kYes, Trans::kNo, 1.0f, x_, dqkv, 1.0f, dw_qkv_.view());
  if (bias_) add_column_sums(dqkv, db_qkv_.data());
  gemm(Trans::kNo, Trans::kYes, 1.0f, dqkv, w_qkv_.view(), 0.0f, dx);
}

}  // namespace moe::model
