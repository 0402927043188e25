// File: umoe_attention.hpp — UMoE attention: token mixing followed by routed FFN experts, the
// experts shared with the block's MoE FFN layer, expert-parallel.
//
// Notation: B sequences, S positions per sequence, T = B*S tokens on this rank (rows ordered
// sequence-major: row b*S + s), d model width, d_qk query/key width (even: RoPE), r query rank,
// E routed experts (global), k attention slots per token, n_s shared experts, f expert width,
// R rows this rank's experts receive.
//
// Pre-mixing form (UMoE, Yang et al. 2025): attention is "mix the tokens, then run an FFN
// expert on the mixture", so the same experts can also serve the FFN sub-layer.
//   route     p = softmax(x W_r), top-k (no renormalisation by default)   W_r [d, E]
//   key       K = RoPE(X W_k)                       one shared single-head key   W_k [d, d_qk]
//   query     q_ti = RoPE(x_t W_q + rms(x_t W_a^i) W_b^i)   for each slot (t, i), i its expert
//                                                   W_q [d, d_qk], W_a^i [d, r], W_b^i [r, d_qk]
//   mix       a_ti = causal softmax(q_ti K^T / sqrt(d_qk));  z_ti = a_ti X   (values = X itself)
//   experts   y_t = sum_i p_ti E_i(z_ti) + sum_s F_s(z_ts)
// rms(u) = u / sqrt(mean(u^2) + eps) has no gain: a gain g would be followed by W_b, and
// diag(g) W_b is just another W_b, so it adds nothing the model cannot already express.
// The n_s shared experts s are always on; each has its own query correction (W_a^(E+s),
// W_b^(E+s)) and its own dense FFN F_s of width f (replicated, like the router).
//
// Storage: W_a for all experts side by side, [d, (E + n_s) r] (one GEMM gives every expert's
// x W_a^i); W_b stacked, [(E + n_s) r, d_qk] (expert i at rows [i r, (i + 1) r)).
//
// Expert parallelism: routing, queries, key, softmax and a X run on the rank that holds the
// token's sequence; only the mixed rows z [T*k, d] (one per slot) travel to the experts' owners
// (Exchange::dispatch_slots with the routing's DispatchPlan) and come back (combine), weighted
// by p locally. The plan is dropless (no capacity: an attention output must not silently
// vanish). Backward mirrors it: combine^T = dispatch_slots of p-scaled dy, experts^T,
// dispatch^T = combine of dz.
//
// The ExpertBank is owned here; the block's MoE FFN layer may borrow it (MoeLayer with a
// borrowed bank), so both sub-layers run the same experts and their backward passes accumulate
// into the one set of expert gradients.
//
// Cache: x (borrowed), route, U = X W_a [T, (E+n_s) r], normalised corrections [T*(k+n_s), r]
// with their 1/rms, rotated queries and keys, probabilities [T*k, S] and [T*n_s, S] (dS in
// backward), z [T*k, d] and [T*n_s, d], the expert rows and the slot outputs [T*k, d].
//
// forward/backward are collective over the layer's communicator (every rank, same order, also
// with T = 0). OpenMP inside: mixing runs as one loop over sequences with 1-thread GEMMs.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "comm/exchange.hpp"
#include "comm/placement.hpp"
#include "comm/plan.hpp"
#include "model/experts.hpp"
#include "model/layers/attention.hpp"
#include "model/layers/ffn.hpp"
#include "model/layers/moe_layer.hpp"
#include "model/routers/topk.hpp"

namespace moe::model {

// model.umoe.* (the expert count, width and activation come from model.moe.*, since the
// experts are the MoE layer's).
struct UmoeConfig {
  int top_k = 2;                // attention slots per token
  int64_t d_qk = 64;            // query/key width (even)
  int64_t query_rank = 16;      // r
  int shared_experts = 1;       // n_s, each with its own query correction
  bool renormalize = false;     // renormalise the top-k probabilities
  double aux_loss_coef = 1e-3;  // sequence-level load balancing (per sequence, then mean)
  double z_loss_coef = 0.0;
  double rope_base = 10000.0;
  float norm_eps = 1e-6f;  // of the query correction's rms

  static UmoeConfig from(const Config& config);
};

struct UmoeStats {
  double aux_loss = 0;           // weighted, global
  double load_balance_loss = 0;  // unweighted, global
  double z_loss = 0;
  comm::LoadStats load;
  int64_t bytes_sent = 0;  // this rank, forward + backward
  double exchange_seconds = 0.0;
};

class UmoeAttention {
 public:
  // moe gives n_experts, d_ff and the activation of the experts; the placement must have
  // moe.n_experts experts over comm.size() ranks. Weights from (seed, name); experts by global
  // id (the same as a MoeLayer's with the same seed). Collective only through the Exchange.
  UmoeAttention(std::string name, int64_t d_model, const UmoeConfig& config, const MoeConfig& moe,
                const comm::ExpertPlacement& placement, const comm::Communicator& comm,
                uint64_t seed);

  // x [T, d] with T = n_seq * S -> y [T, d] (y must not alias x). x must stay valid until
  // backward(). Collective.
  void forward(ConstView x, int64_t n_seq, View y);
  // Incremental (inference) forward, as Attention::forward_cached: x [N, d] holds n_new[b] new
  // tokens of sequence b, back to back; each cache keeps the rotated key in columns [0, d_qk)
  // of k and the hidden state x in v (d_qk <= d). Appends to the caches and attends causally
  // over them; equals forward() on the full sequences row for row. No backward cache.
  // Collective (router and exchange), also with N = 0.
  void forward_cached(ConstView x, std::span<const int64_t> n_new, std::span<KvCache* const> caches,
                      View y);
  // dy [T, d] -> dx [T, d] (overwritten; must not alias dy). aux_scale multiplies the router's
  // auxiliary loss. ACCUMULATES every gradient (experts' included). Collective.
  void backward(ConstView dy, View dx, float aux_scale = 1.0f);

  ExpertBank& experts() { return experts_; }
  Router& router() { return *router_; }
  const RouteResult& route() const { return route_; }
  const UmoeStats& stats() const { return stats_; }
  double aux_loss() const { return stats_.aux_loss; }
  const UmoeConfig& config() const { return config_; }
  // Probabilities of routed slot j of sequence b from the last forward, [S, S] with row s
  // the query of token s (zeros above the diagonal); before backward.
  ConstView probs(int64_t b, int j) const;
  // Replicated: router, W_q, W_k, W_a, W_b, shared experts; relative names ("router.w",
  // "w_q", "shared.0.w1"). params() adds the experts; both prefixed with the layer's name.
  std::vector<ParamRef> replicated_params();
  std::vector<ParamRef> params();
  void zero_grad();

 private:
  // One group of query rows: m queries per token (rows t*m + j), their probabilities and mixed
  // rows.
  struct Mix {
    int m = 0;
    Tensor q;      // [T*m, d_qk] rotated queries; dL/dq in backward
    Tensor v;      // [T*m, r] normalised corrections rms(x W_a^i)
    Tensor inv;    // [T*m] 1 / rms
    Tensor probs;  // [T*m, S]; dS in backward
    Tensor z;      // [T*m, d]; dL/dz in backward
  };
  // Expert id of query row (t, j) of a group: routed: route_.expert (may be -1); shared: E + j.
  int expert_of(const Mix& g, int64_t t, int j) const;
  void queries_forward(Mix& g, ConstView x);  // unrotated
  void queries_rotate(Mix& g);                // RoPE on full sequences (forward)
  void experts_forward(int64_t T, View y);
  void mix_forward(Mix& g, ConstView x);
  void mix_backward(Mix& g, ConstView x, View dx, View dk);
  void queries_backward(Mix& g, View dqb, View du);

  std::string name_;
  int64_t d_, dqk_, r_;
  int E_;
  UmoeConfig config_;
  MoeConfig moe_;
  comm::ExpertPlacement placement_;
  const comm::Communicator& comm_;
  std::unique_ptr<TopKRouter> router_;
  ExpertBank experts_;
  std::vector<std::unique_ptr<Ffn>> shared_;  // [n_s]
  comm::Exchange ex_;
  Rope rope_;
  Tensor w_q_, dw_q_;  // [d, d_qk]
  Tensor w_k_, dw_k_;  // [d, d_qk]
  Tensor w_a_, dw_a_;  // [d, (E + n_s) r]
  Tensor w_b_, dw_b_;  // [(E + n_s) r, d_qk]

  // Cache of the last forward.
  ConstView x_;
  int64_t n_seq_ = 0, s_ = 0;
  RouteResult route_;
  comm::DispatchPlan plan_;
  Tensor qb_;  // [T, d_qk] x W_q (unrotated); backward: sum of dL/dq per token
  Tensor k_;   // [T, d_qk] rotated keys
  Tensor u_;   // [T, (E + n_s) r] x W_a; backward: dL/du
  Mix routed_, shared_mix_;
  ExpertCache cache_;
  Tensor xin_, yout_;       // [R, d] expert rows (dL/dxin, dL/dyout in backward)
  Tensor slot_out_;         // [T*k, d] expert output per slot
  Tensor ds_;               // [T*k, d] p-scaled dy per slot
  Tensor dweight_;          // [T, k]
  Tensor shared_out_;       // [T, d] one shared expert's output
  Tensor dk_;               // [T, d_qk]
  std::vector<Tensor> dp_;  // per thread: [S*m, S] dL/dprobs
  // Incremental decoding scratch.
  Rope rope_decode_;            // tables from position 0
  std::vector<Tensor> scores_;  // per thread: [n_new m, len] probabilities
  std::vector<int64_t> row0_;   // [B + 1] first row of each sequence
  UmoeStats stats_;
};

}  // namespace moe::model
