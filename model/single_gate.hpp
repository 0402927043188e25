// File: single_gate.hpp — the single-gate MoE (Royer et al., "Revisiting single-gated mixtures
// of experts"): one gate per sequence on the base branch's pooled features; each sequence runs
// one expert's copy of the later blocks; the prediction ensembles expert and base branch.
//
// Notation: B sequences on this rank, S positions, N = B*S tokens, d model width, V vocabulary,
// L blocks, L_s shared blocks (model.single_gate.shared_layers), E experts, E_l experts on this
// rank, R sequences this rank's experts receive, P ranks, a = model.single_gate.ensemble.
//
//   x_s = blocks[0, L_s)(embed(ids))                     shared early blocks, replicated [N, d]
//   h_b = base_norm(x_s);  z_b = base_head(h_b)          the base branch's logits       [N, V]
//   u_b = mean_t h_b[b, t, :]                            pooled features of sequence b  [B, d]
//   g_b = softmax(u_b W_g + c_g);  e_b = argmax g_b      the gate: one expert per sequence
//   z_e = head(final_norm_e(blocks_e[L_s, L)(x_s)))      on e_b's owner rank, for the whole
//                                                        sequence                        [N, V]
//   p   = a softmax(z_b) + (1 - a) softmax(z_e)          the ensemble (probabilities averaged)
//   loss = sum_n -log p_n[target_n] / normaliser
// With r_n = a softmax(z_b)[t] / p[t] (the base branch's share of the target's probability):
//   dz_b = r (softmax(z_b) - onehot) / normaliser,  dz_e = (1 - r)(softmax(z_e) - onehot) / ...
// a = 0 is the expert alone (no ensemble); the base head then gets no gradient.
//
// Expert parallelism: expert e (its later blocks and final norm) lives on one rank
// (placement: contiguous blocks). A sequence moves as ONE row of width S*d through the same
// DispatchPlan / Exchange as the token-level MoE layer (k = 1 slot per sequence), so all of a
// sequence's tokens reach the same expert by construction, attention inside the expert sees the
// whole sequence, and the backward is the same two movements reversed. The embedding, shared
// blocks, base branch, gate and LM head are replicated (data parallel); the LM head is shared by
// the experts (tied to the embedding or not), only the blocks and the final norm are copied.
//
// Phases (model/single_gate_train.cpp runs them within train.steps):
//   kBase     the base model: the later blocks are ONE replicated copy (named like a dense
//             Transformer's: "blocks.3.ffn.w1", "final_norm.gain"), no gate, no exchange; the
//             ensemble loss trains the base head too.
//   (K-means on the pooled features initialises the gate; every expert copies the base's later
//    blocks: copy_base_into_experts, set_gate_from_centroids.)
//   kExperts  gate fixed (no gradient); each sequence to its gate's expert. With freeze_base
//             (the default) the embedding, shared blocks and base branch are fixed too (no
//             gradient, no backward through them): the pooled features, hence the K-means
//             clusters the gate encodes, stay what they were at phase (b). Without it they keep
//             training and the features drift away from the fixed centroids (gate collapse).
//   kGate     experts frozen; each sequence goes to all E experts (k = E slots) and its
//             ensemble loss under each is computed at home; the gate is trained by
//             cross-entropy towards the best expert (lowest loss), averaged over the global
//             sequences. Only the gate gets gradients.
//
// Causality: the gate sees the whole sequence (mean over all positions), so a position's
// prediction depends on the choice made from later tokens: log E bits per sequence. For
// generation the gate is computed on the prompt.
//
// Early exit (score(), inference only): sequence b exits when its base confidence
// c_b = mean_t max_v softmax(z_b)[n, v] exceeds model.single_gate.exit_threshold; its
// prediction is then softmax(z_b) alone and it is not dispatched. A threshold <= 0 exits every
// sequence with no collective at all (no plan, no exchange); otherwise the ranks agree (one
// all-reduce) and skip the plan and exchange when no sequence remains.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/exchange.hpp"
#include "comm/placement.hpp"
#include "comm/plan.hpp"
#include "model/transformer.hpp"

namespace moe::model {

struct SingleGateConfig {
  int shared_layers = 1;        // L_s: blocks of the base branch, 1 <= L_s < L
  double ensemble = 0.5;        // a: weight of the base branch's probabilities
  double exit_threshold = 1.0;  // early exit when the base confidence exceeds it (1: never)
  double base_fraction = 0.4;   // phase (a) steps / train.steps
  double gate_fraction = 0.1;   // phase (d) steps / train.steps
  int64_t kmeans_sequences = 256;
  int kmeans_iters = 10;
  std::string base_checkpoint;  // start from this base model, skip phase (a)
  bool freeze_base = true;      // phase (c) trains only the experts (and an untied LM head)

  // Reads model.single_gate.*; checks L_s against model.n_layers. Throws kConfig errors.
  static SingleGateConfig from(const Config& config, const ModelConfig& model);
};

enum class SingleGatePhase { kBase, kExperts, kGate };
const char* phase_name(SingleGatePhase p);

// Figures of the last forward (global unless said otherwise).
struct SingleGateStats {
  std::vector<int64_t> expert_sequences;    // [E] sequences each expert received
  double expert_imbalance = 0;              // max / mean of expert_sequences (0 in kBase)
  int64_t sequences = 0;                    // sequences in the forward
  int64_t exited = 0;                       // sequences that left early (score())
  double gate_loss = 0, gate_accuracy = 0;  // kGate: CE to the best expert, argmax hits
  double exchange_seconds = 0;              // this rank, cumulative
  int64_t bytes_sent = 0;                   // this rank, cumulative
  int64_t exchanges = 0;                    // plans built (each one collective), cumulative
};

class SingleGateModel {
 public:
  // Collective over comm (placement check). Weights from seed; E >= P.
  SingleGateModel(const ModelConfig& model, const SingleGateConfig& sg,
                  const comm::Communicator& comm, uint64_t seed);
  ~SingleGateModel();

  // windows [B, S + 1] -> this rank's loss share (sum of its targets' losses / normaliser; in
  // kGate the gate loss: sum over its sequences / normaliser, normaliser = global sequences).
  // Keeps what backward needs. Collective (kExperts, kGate): every rank calls, also with B = 0.
  double forward(SingleGatePhase phase, std::span<const int32_t> windows, int64_t n_seq,
                 int64_t seq_len, double normaliser);
  // ACCUMULATES the gradients of the last forward's phase. Collective (kExperts).
  void backward();
  // Inference loss with early exit (see the top); no backward. Collective.
  double score(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len, double normaliser);

  // Tests: route this rank's sequences to these experts instead of the gate's choice (empty:
  // the gate decides). Applies to kExperts and score().
  void force_experts(std::vector<int32_t> experts) { forced_ = std::move(experts); }
  // This rank's sequences' experts in the last forward (-1: exited).
  const std::vector<int32_t>& routed() const { return routed_; }
  // Rows local expert i received in the last forward: [n_i * S, d], sequences back to back.
  ConstView received(int local) const;
  // Pooled features u [B, d] of the last forward (the K-means input).
  ConstView pooled() const;
  // Only the base branch over windows [B, S + 1]; returns pooled() (no backward). Local.
  ConstView pool(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len);

  // Phase (b): every local expert's blocks and final norm take the base's values. Local.
  void copy_base_into_experts();
  // Phase (b): gate logits = 2 u.c_e - |c_e|^2 (argmax = nearest centroid). centroids [E, d].
  void set_gate_from_centroids(ConstView centroids);

  // Replicated parameters trained in a phase, every replicated parameter (checkpoints), and
  // this rank's experts' parameters ("experts.<gid>.blocks.<l>.attn.w_qkv").
  std::vector<ParamRef> dense_params(SingleGatePhase phase);
  std::vector<ParamRef> all_dense_params();
  std::vector<ParamRef> expert_params();
  // The same expert tensors grouped by expert for checkpoints: (global id, params named
  // "blocks.<l>.attn.w_qkv", "final_norm.gain").
  std::vector<std::pair<int, std::vector<ParamRef>>> expert_groups();
  // The parameters a base checkpoint provides (dense Transformer names), and the base branch's
  // own (base_norm, untied base_head) which a dense Transformer checkpoint lacks.
  std::vector<ParamRef> base_model_params();
  std::vector<ParamRef> base_branch_params();
  void zero_grad();

  const SingleGateStats& stats() const { return stats_; }
  const ModelConfig& config() const { return config_; }
  const SingleGateConfig& sg_config() const { return sg_; }
  const comm::ExpertPlacement& placement() const { return placement_; }
  int n_local() const { return static_cast<int>(experts_.size()); }

 private:
  class Stack;
  struct Expert;
  void read_windows(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len);
  void run_base(int64_t n_seq, int64_t seq_len);  // embed, shared blocks, base branch, pooling
  void choose_experts(int64_t n_seq);             // gate argmax (or forced) into routed_
  // Sends routed_ sequences (k = 1) or every sequence to all experts (k = E, all = true) of
  // x_s through the local experts; h_home_ [B*k, S*d] receives their final-norm outputs.
  void run_experts(int64_t n_seq, int64_t seq_len, bool all);
  void record_plan_stats();

  ModelConfig config_;
  SingleGateConfig sg_;
  const comm::Communicator& comm_;
  comm::ExpertPlacement placement_;
  comm::Exchange exchange_;
  std::unique_ptr<Embedding> embed_;
  std::unique_ptr<Stack> shared_, base_later_;
  std::unique_ptr<RmsNorm> base_norm_, final_norm_;  // final_norm_: the base's (kBase)
  std::unique_ptr<LmHead> base_head_, head_;
  Tensor w_gate_, dw_gate_;                       // [d, E]
  Tensor b_gate_, db_gate_;                       // [1, E]
  std::vector<std::unique_ptr<Expert>> experts_;  // [E_l]

  // The last forward.
  SingleGatePhase phase_ = SingleGatePhase::kBase;
  int64_t n_seq_ = 0, seq_len_ = 0;
  double normaliser_ = 1;
  std::vector<int32_t> ids_, targets_;  // [N]
  std::vector<int32_t> forced_, routed_;
  std::vector<int32_t> slot_expert_;  // [B, k] routing of the plan
  std::vector<float> slot_weight_;    // [B, k]
  std::unique_ptr<comm::DispatchPlan> plan_;
  Tensor x0_;                             // [N, d] embedding output
  ConstView xs_;                          // [N, d] shared blocks' output (their buffer)
  View zb_;                               // [N, V] base logits, then dz_b (base_head's buffer)
  std::vector<double> row_loss_;          // [N]
  Tensor h_base_, pooled_, gate_logits_;  // [N, d], [B, d], [B, E]
  Tensor h_full_;                         // [N, d] kBase: final norm output
  Tensor recv_, expert_out_, h_home_;     // [R, S*d], [R, S*d], [B*k, S*d]
  Tensor grad_, tmp_;                     // backward scratch
  std::vector<int32_t> best_;             // [B] kGate target expert
  SingleGateStats stats_;
};

}  // namespace moe::model
