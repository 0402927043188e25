// File: attention.hpp — causal multi-head self-attention with RoPE, explicit backward.
//
// Notation: B sequences, T positions per sequence, N = B*T tokens on this rank (rows ordered
// sequence-major: row b*T + t), d model width, H heads, d_h = d/H head width.
//
//   qkv = x Wqkv (+ bqkv)                 Wqkv [d, 3d]: columns [q | k | v], head h at h*d_h
//   q, k <- RoPE(q, k) per head            positions pos0 + t
//   S = q k^T / sqrt(d_h), masked j > t    per (sequence, head): [T, T]
//   P = softmax(S) row-wise                (max subtracted first: no overflow for any S)
//   o = P v                                [T, d_h] into att [N, d] at head h's columns
//   y = att Wo (+ bo)                      Wo [d, d]
//
// RoPE (rotary position embedding, base 10000 by default), the half-split convention: in each
// head, dimension i < d_h/2 pairs with i + d_h/2 and the pair is rotated by the angle
// (pos0 + t) * base^(-2i/d_h):  (a, b) -> (a cos - b sin, a sin + b cos). Since a rotation by m
// and one by n leave the dot product depending only on n - m, scores depend only on relative
// positions; pos0 (0 in training) lets generation continue a sequence. Angles are computed in
// double and rounded once, so long positions stay accurate.
//
// Cache (what backward needs), kept by forward:
//   x      [N, d]         borrowed input (must stay valid until backward)
//   qkv    [N, 3d]        q, k after RoPE, and v
//   probs  [B*H, ~T^2/2]  attention probabilities, only the causal tiles (below)
//   att    [N, d]         head outputs before Wo
// Causal tiles: queries are taken in tiles of q_t rows (AttentionConfig::query_tile); tile
// [r0, e) attends to keys [0, e), so its scores, probabilities and products cover only the
// [e - r0, e] blocks on or below the diagonal, stored back to back (row stride e). With
// T 256 and q_t 64 that is 10 of the 16 [64, 64] blocks: 62.5% of the full [T, T] work and
// memory, (T/q_t + 1) / (2 T/q_t) in general. Cache size: 4 (4 N d + B H T (T + q_t) / 2)
// bytes per layer: with B 8, T 256, d 256, H 4 that is 5 MiB of probabilities and 8 MiB of
// the rest. Storing P rather than recomputing it saves one [T, T, d_h] GEMM and the softmax
// per head in backward; at these T the probabilities are smaller than the activations, so
// storing wins. Backward overwrites probs with dS (one backward per forward).
//
// Parallelism: the projections are single BLIS GEMMs on all threads (called from serial
// code); RoPE, scores, softmax and P v run as one OpenMP loop over the B*H (sequence, head)
// pairs, each with 1-thread GEMMs. Each pair writes only its own rows and columns, so there
// are no races and results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "model/params.hpp"
#include "runtime/gemm.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

// Rotary tables for positions [pos0, pos0 + T) of a head of width d_h (even).
class Rope {
 public:
  Rope(int64_t d_head, double base = 10000.0);
  // Fills the cos/sin tables [T, d_h/2] unless they already hold (pos0, T).
  void prepare(int64_t pos0, int64_t n_pos);
  // x [T', d_h] with T' <= T: rows are positions pos0 .. pos0 + T' - 1; rotated in place.
  void apply(View x) const;
  // The transpose (inverse) rotation: turns dL/d(rotated) into dL/d(unrotated), in place.
  void apply_transpose(View x) const;
  // x [T', d_h]: row t is position first + t, with first + T' within the prepared tables
  // (which must start at position 0); rotated in place. Same values as apply().
  void apply_at(View x, int64_t first) const;
  int64_t d_head() const { return dh_; }
  int64_t n_pos() const { return pos0_ == 0 ? n_pos_ : 0; }

 private:
  void rotate(View x, int64_t first, float sign) const;
  int64_t dh_;
  double base_;
  int64_t pos0_ = -1, n_pos_ = 0;
  Tensor cos_, sin_;  // [T, d_h/2]
};

// One sequence's keys and values for one attention layer, for incremental decoding:
// k, v [capacity, d] (head h at columns h*d_h), rows 0 .. len - 1 filled, k after RoPE.
// Preallocated: appending never allocates.
struct KvCache {
  KvCache() = default;
  KvCache(int64_t capacity, int64_t d_model);
  int64_t capacity() const { return cap; }

  Tensor k, v;      // [capacity, d]
  int64_t len = 0;  // filled positions
  int64_t cap = 0, d = 0;
};

// A decode step's sequences: checks that sequence b can append n_new[b] rows of width d to its
// cache (an error naming `layer` otherwise), sets row0 [B + 1] to each sequence's first row in
// the step's stacked rows, and returns the largest cache capacity (0 with no sequence).
int64_t stack_cached_rows(const std::string& layer, int64_t d, std::span<const int64_t> n_new,
                          std::span<KvCache* const> caches, std::vector<int64_t>& row0);

struct AttentionConfig {
  int64_t n_heads = 4;
  bool bias = false;  // biases on the QKV and output projections
  double rope_base = 10000.0;
  // Query rows per causal tile: scores, softmax and mixing touch only the key blocks on or
  // below the diagonal (T = 256, tile 64: 10 of 16 blocks). Not a config key; any value >= 1
  // gives the same results up to float rounding.
  int64_t query_tile = 64;
};

class Attention {
 public:
  // Wqkv ~ U(-1/sqrt(d), 1/sqrt(d)), Wo ~ U(-1/sqrt(d), 1/sqrt(d)), biases 0, from (seed, name).
  Attention(std::string name, int64_t d_model, const AttentionConfig& config, uint64_t seed);

  // x [N, d] with N = n_seq * T -> y [N, d] (y must not alias x). Local; OpenMP inside.
  void forward(ConstView x, int64_t n_seq, View y, int64_t pos0 = 0);
  // Incremental (inference) forward over B sequences of different lengths: x [N, d] holds
  // n_new[b] new tokens of sequence b, sequences back to back (N = sum n_new). Sequence b's
  // new tokens take positions caches[b]->len onward; their keys and values are appended to
  // the cache and each attends causally over the whole cache. y [N, d] (must not alias x).
  // Equals forward() on the full sequences, row for row. Keeps no backward cache. Local.
  void forward_cached(ConstView x, std::span<const int64_t> n_new, std::span<KvCache* const> caches,
                      View y);
  // Packs W_qkv and W_o for forward_cached (runtime/gemm.hpp gemm_packed), which then uses
  // the packed copies. Call again after the weights change. kBf16 first rounds W_qkv and W_o
  // to bf16 in place (round_to_bf16(), for good) and packs bf16 panels.
  void pack_for_inference(WeightType weights = WeightType::kFp32);
  // Rounds W_qkv and W_o to the nearest bf16 values, in place (kept in fp32). Local.
  void round_to_bf16();
  // dy [N, d] -> dx [N, d] (overwritten; may alias dy or x). ACCUMULATES the
  // parameter gradients. Consumes the cache.
  void backward(ConstView dy, View dx);

  // Bytes of the backward cache held now: probabilities, and q/k/v plus head outputs.
  int64_t probs_bytes() const { return probs_.numel() * 4; }
  int64_t cache_bytes() const { return (qkv_.numel() + att_.numel()) * 4; }
  int64_t d_model() const { return d_; }
  int64_t n_heads() const { return h_; }
  int64_t d_head() const { return dh_; }
  View w_qkv() { return w_qkv_.view(); }
  View w_o() { return w_o_.view(); }
  // Probabilities of (sequence b, head h) from the last forward, before backward, as a full
  // [T, T] copy (zeros above the diagonal).
  Tensor probs(int64_t b, int64_t h) const;
  // "<name>.w_qkv", "<name>.w_o" and, with biases, "<name>.b_qkv", "<name>.b_o".
  std::vector<ParamRef> params();
  void zero_grad();

 private:
  // tile_off_[i]: offset of query tile i's [rows, end] probabilities within a pair's block;
  // tile_off_.back() floats per (sequence, head) pair.
  void plan_tiles(int64_t T);

  std::string name_;
  int64_t d_, h_, dh_, tile_;
  bool bias_;
  Rope rope_;
  Tensor w_qkv_, dw_qkv_;  // [d, 3d]
  Tensor b_qkv_, db_qkv_;  // [1, 3d] (with biases)
  Tensor w_o_, dw_o_;      // [d, d]
  Tensor b_o_, db_o_;      // [1, d] (with biases)

  // Cache of the last forward.
  ConstView x_;  // [N, d] borrowed
  int64_t n_seq_ = 0, t_ = 0;
  Tensor qkv_;    // [N, 3d] q, k rotated
  Tensor probs_;  // [B*H, tile_off_.back()] lower-triangular tiles; dS after backward
  std::vector<int64_t> tile_off_;
  Tensor att_;  // [N, d]
  // Backward scratch.
  Tensor dqkv_;             // [N, 3d]
  std::vector<Tensor> dp_;  // per thread: [T, T] dL/dP

  // Incremental decoding scratch.
  Rope rope_decode_;               // tables from position 0
  Tensor qkv_new_, att_new_;       // [N, 3d], [N, d]
  std::vector<Tensor> scores_;     // per thread: [H, len] scores / probabilities of one row
  PackedB packed_qkv_, packed_o_;  // pack_for_inference(); empty until then
  std::vector<int64_t> row0_;      // [B + 1] first row of each sequence
};

}  // namespace moe::model
