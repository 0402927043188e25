// File: peer.hpp — PEER: many single-neuron experts chosen by product-key retrieval ("Mixture
// of A Million Experts", He 2024), with the expert tables sharded over ranks.
//
// Notation: T tokens on this rank, d model width, H heads, k experts per head, S = H k slots
// per token, dk query/key width, n sub-keys per half, N = n^2 experts, P ranks, N_l rows of
// U and V on this rank, Q pairs (token, owner rank) this rank sends, R pairs it receives,
// E_s / E_r entries (slots) it sends / receives.
//
//   q_h   = BN_h(x Wq_h)                    H query networks, Wq [d, H dk] (heads side by side)
//   ids, s = product_key_topk(q_h; C, C')   top-k of N keys, C, C' [n, dk/2] shared by heads
//   g     = softmax_k(s)                    per (token, head)
//   y     = sum_h sum_{j in ids_h} g_j gelu(u_j . x) v_j            U, V [N, d]
// sigma is GELU (erf form, model/layers/activation.hpp), as the dense FFN and the experts.
//
// Batch normalisation of the query (model.peer.batch_norm, on by default): in training mode the
// statistics are those of the GLOBAL batch (one all-reduce of per-column sums in forward, one in
// backward), so the layer gives the same result on any rank count; biased variance, eps 1e-5,
// learnable gain and bias. Each training forward also updates running statistics (momentum
// 0.1, unbiased variance); inference mode (set_training(false): decoding, serving) normalises
// with them instead, which works for one token at a time.
//
// Sharding. U and V are split by expert-id range in blocks of n rows (block i = the experts
// i n .. i n + n - 1 that share first sub-key i); rank r owns blocks [r n / P, (r + 1) n / P)
// (comm::ExpertPlacement::blocked over n blocks, so n >= P). Wq, BN and the sub-keys are
// replicated: they are small (d H dk + 2 n dk/2 floats), every token needs all of them to
// retrieve, and replicating them keeps retrieval local (no round trip before the exchange).
//
// Exchange (embedding style, one pair per (token, owner rank)):
//   forward   each rank sends, per pair, the token row x_t [d] once plus its entries
//             (local row id, pair, gate: 12 bytes each); the owner computes
//             sum_e g_e gelu(u_e . x_t) v_e over the pair's entries and returns one row [d].
//   backward  dy_t goes out per pair [d]; the owner returns dL/dx_t's part [d] and dL/dg per
//             entry (4 bytes), and accumulates its own row gradients.
// Bytes per token with p owners hit (p <= min(P, S)), forward + backward:
//   this scheme:   p (4 d + 4 d + 4 d + 4 d) + S (12 + 4)       = 16 p d + 16 S
//   fetching rows: S (4 d + 4 d) to read u, v and S (4 d + 4 d) to return their gradients
//                  = 16 S d
// e.g. d = 256, H = 8, k = 16 (S = 128), P = 4: <= 16.4 KiB versus 512 KiB; sending tokens
// is smaller whenever p < S, i.e. always once S > P. (Rows to this rank itself go through
// the same MPI_Alltoallv; stats() counts only bytes to other ranks.)
//
// Gradients of U and V are row-sparse: backward writes only the rows retrieved since the last
// zero_grad() (touched_rows()), zero_grad() clears only those rows, and the optimiser updates
// only those rows (AdamW's sparse form, model/optim.hpp).
//
// Every method except the accessors is collective over the layer's communicator (every rank
// calls it, in the same order, also with T = 0).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/placement.hpp"
#include "model/params.hpp"
#include "model/routers/product_key.hpp"
#include "runtime/config.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

// The `model.peer.*` configuration block (runtime/config.cpp documents every key).
struct PeerConfig {
  int n_sub_keys = 32;  // n: N = n^2 experts
  int heads = 8;        // H
  int top_k = 16;       // k per head
  int64_t d_key = 32;   // dk, even
  bool batch_norm = true;
  int layer = -1;  // the block whose FFN is PEER; -1: the middle block (n_layers / 2)
  double bn_momentum = 0.1;
  float bn_eps = 1e-5f;

  int64_t n_experts() const { return int64_t{n_sub_keys} * n_sub_keys; }
  static PeerConfig from(const Config& config);
};

// Per-call figures of this rank (bytes exclude rows this rank sends to itself).
struct PeerStats {
  int64_t pairs_sent = 0;    // (token, owner) pairs of the last forward
  int64_t entries_sent = 0;  // slots of the last forward (T S)
  int64_t bytes_sent = 0;    // last forward + backward
  int64_t bytes_received = 0;
  double exchange_seconds = 0;   // last forward + backward, inside MPI_Alltoallv
  double retrieval_seconds = 0;  // last forward: query networks + product-key top-k
};

// Expert usage over a window of steps (identical on every rank).
struct PeerUsage {
  double usage = 0;       // fraction of the N experts retrieved at least once
  double kl_uniform = 0;  // KL(z || uniform), z = retrieval counts / their sum
  int64_t retrievals = 0;
};

class PeerLayer {
 public:
  // Weights from seed: the query networks and sub-keys replicated, U and V by global block id
  // (the same global tables on any rank count). Throws Error(kConfig) naming the keys when
  // d_key is odd, top_k > n_sub_keys, or n_sub_keys < P.
  PeerLayer(std::string name, int64_t d_model, const PeerConfig& config,
            const comm::Communicator& comm, uint64_t seed);

  // x [T, d] -> y [T, d]. x must stay valid until backward(). Collective.
  void forward(ConstView x, View y);
  // dy [T, d] -> dx [T, d] (overwritten). ACCUMULATES every gradient. Training mode only.
  // Collective.
  void backward(ConstView dy, View dx);
  // Training mode (default) normalises queries with batch statistics; inference mode with the
  // running statistics. Local (every rank must use the same mode).
  void set_training(bool training) { training_ = training; }
  bool training() const { return training_; }

  // Replicated parameters (gradients summed over data-parallel ranks by the caller):
  // "<name>.wq", "<name>.query_norm.gain", "<name>.query_norm.bias", "<name>.keys1",
  // "<name>.keys2".
  std::vector<ParamRef> dense_params();
  // Running BN statistics "<name>.query_norm.running_mean|running_var" [1, H dk]: state, not
  // trained (checkpointed without optimiser moments). Empty without batch norm.
  std::vector<ParamRef> buffers();
  // The local rows of U and V ("<name>.u", "<name>.v", [N_l, d]), gradients row-sparse with
  // sparse_rows = &touched_rows().
  std::vector<ParamRef> table_params();
  const std::vector<int64_t>& touched_rows() const { return touched_; }
  void zero_grad();

  // Local block b (of n rows) of U and V: global block first_block() + b.
  int first_block() const { return block_begin_; }
  int n_blocks_local() const { return block_end_ - block_begin_; }
  View u_block(int b) { return u_.view().row_range(int64_t{b} * n_, n_); }
  View v_block(int b) { return v_.view().row_range(int64_t{b} * n_, n_); }
  View u() { return u_.view(); }
  View v() { return v_.view(); }
  View du() { return du_.view(); }
  View dv() { return dv_.view(); }
  View wq() { return wq_.view(); }
  View dwq() { return dwq_.view(); }
  View keys1() { return keys1_.view(); }
  View keys2() { return keys2_.view(); }
  View dkeys1() { return dkeys1_.view(); }
  View dkeys2() { return dkeys2_.view(); }
  View bn_gain() { return gain_.view(); }
  View bn_bias() { return bias_.view(); }
  View dbn_gain() { return dgain_.view(); }
  View dbn_bias() { return dbias_.view(); }
  int64_t row_begin() const { return int64_t{block_begin_} * n_; }
  int64_t n_rows_local() const { return u_.dim(0); }
  const PeerConfig& config() const { return config_; }
  const PeerStats& stats() const { return stats_; }
  // The last forward's retrieval: expert ids and gates [T, H, k].
  const std::vector<int32_t>& expert_ids() const { return ids_; }
  const std::vector<float>& gates() const { return gate_; }

  // Usage since the previous reset (retrieval counts of training and inference forwards).
  // Collective (one all-reduce).
  PeerUsage usage(bool reset);

 private:
  struct Entry {   // one slot as sent to its owner: 12 bytes on the wire
    int32_t pair;  // index of its (token, owner) pair within the sender's block for this owner
    int32_t row;   // local row at the owner
    float gate;
  };
  void normalise_queries(int64_t T);
  void normalise_backward(int64_t T);
  void build_pairs(int64_t T);
  void owner_forward();
  void owner_backward();
  double exchange_rows(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                       const std::vector<int64_t>& recv_counts, int64_t row_bytes,
                       const char* what);

  std::string name_;
  int64_t d_;
  PeerConfig config_;
  const comm::Communicator& comm_;
  comm::ExpertPlacement placement_;  // over the n blocks
  int64_t n_, H_, k_, dk_, S_;
  int block_begin_ = 0, block_end_ = 0;
  bool training_ = true;

  Tensor wq_, dwq_;                  // [d, H dk]
  Tensor gain_, dgain_;              // [1, H dk]
  Tensor bias_, dbias_;              // [1, H dk]
  Tensor run_mean_, run_var_;        // [1, H dk]
  Tensor keys1_, dkeys1_;            // [n, dk/2]
  Tensor keys2_, dkeys2_;            // [n, dk/2]
  Tensor u_, du_, v_, dv_;           // [N_l, d]
  std::vector<uint8_t> is_touched_;  // [N_l]
  std::vector<int64_t> touched_;     // rows with a non-zero gradient since zero_grad
  std::vector<int64_t> hits_;        // [N_l] retrievals since the last usage reset

  // Cache of the last forward (source side).
  ConstView x_;
  Tensor q_, qhat_, qn_;             // [T, H dk] raw, normalised, after gain/bias
  std::vector<double> mean_, rstd_;  // [H dk] statistics used
  ProductKeyScratch pk_;
  std::vector<int32_t> ids_;                    // [T S]
  std::vector<float> score_, gate_;             // [T S]
  std::vector<int64_t> pairs_to_, entries_to_;  // [P]
  std::vector<int64_t> pair_token_;             // [Q] token of each sent pair (grouped by owner)
  std::vector<int64_t> entry_slot_;             // [E_s] slot t S + s of each sent entry
  std::vector<Entry> send_entries_;             // [E_s]
  Tensor send_rows_, back_rows_;                // [Q, d] x (fwd) / dy (bwd) out; owner results back
  std::vector<float> back_dgate_;               // [E_s]
  // Owner side.
  std::vector<int64_t> pairs_from_, entries_from_;  // [P]
  std::vector<Entry> recv_entries_;                 // [E_r]
  std::vector<int64_t> entry_pair_;                 // [E_r] global received pair
  std::vector<int64_t> pair_begin_;                 // [R + 1] entries of each received pair
  Tensor recv_x_, recv_dy_, out_rows_;              // [R, d]
  std::vector<float> act_;                          // [E_r] u . x
  std::vector<float> dact_, dgate_;                 // [E_r]
  std::vector<int64_t> by_row_;                     // [E_r] entries sorted by row
  Tensor dqn_;                                      // [T, H dk]
  std::vector<float> dscore_;                       // [T S]
  PeerStats stats_;
};

}  // namespace moe::model
