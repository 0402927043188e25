// File: topk.hpp — the top-k softmax router (Switch k=1, GShard/Mixtral k=2).
//
// Notation: T tokens on this rank, N tokens over all ranks, d model width, E experts, k slots.
//
//   logits = x W_r              [T, E]  fp32 (W_r [d, E], replicated on every rank)
//   p      = softmax(logits)    [T, E]
//   slots  = the k largest p per token, larger first; equal p: the lower expert id wins
//   weight = p_sel, or p_sel / sum(p_sel) with renormalize (Mixtral style)
//   load-balancing loss  LB = E * sum_i f_i P_i   f_i = slots routed to i / (N k),
//                                                 P_i = sum_t p_ti / N    (both GLOBAL)
//   z-loss               Z  = sum_t logsumexp(logits_t)^2 / N               (GLOBAL mean)
//   aux_loss = aux_loss_coef * LB + z_loss_coef * Z
// f_i is a count (no gradient), as in Switch. With a null communicator this rank is the whole
// batch (unit tests, single process).
//
// Sequence scope (sequence_balance; the UMoE attention router): the caller names the sequences
// of each call (set_sequences: row offsets, every sequence whole on this rank), and
//   LB = mean over the n_seq sequences of ALL ranks of  E * sum_i f_i^s P_i^s,
//   f_i^s = slots of sequence s routed to i / (S_s k),  P_i^s = sum_{t in s} p_ti / S_s,
// so dLB/dp_ti = E f_i^s / (S_s n_seq) for t in s. Only the sum over sequences and n_seq are
// reduced, so the loss does not depend on the rank count.
//
// Loss-free bias balancing (model.moe.router: topk_bias, DeepSeek-V3): a bias b [E] (not
// trained by the optimiser; replicated, checkpointed) enters only the SELECTION,
//   slots  = the k largest p_ti + b_i per token (ties: the lower expert id),
// while the weights stay p_sel (renormalised or not, as above) and the backward is unchanged.
// After each optimiser step (end_step), with load_i the slots routed to i over the global batch
// of every training micro-step since the previous update (counted in backward, so evaluation
// forwards do not count):
//   b_i <- b_i + gamma * sign(mean_j load_j - load_i)
// The load-balancing loss is still computed and reported, but its coefficient is 0 in this
// mode (the bias does the balancing); the z-loss applies as configured.
#pragma once

#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "model/routers/router.hpp"

namespace moe::model {

struct TopKOptions {
  int n_experts = 8;
  int k = 2;
  bool renormalize = true;
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.001;
  // Where the load-balancing statistics f_i and P_i are taken:
  //   true  (global): over every rank's tokens of this call, reduced across ranks;
  //   false (rank):   over this rank's tokens, the loss being the mean of the ranks' losses.
  // With gradient accumulation only the rank scope makes the groups of tokens (each rank's
  // micro-batch) the same on any rank count, so only it gives rank-count-independent training.
  // The z-loss is a mean over tokens and is the same either way.
  bool global_balance = true;
  // Loss-free bias balancing (see the top); gamma = bias_update_rate.
  bool bias_balance = false;
  double bias_update_rate = 1e-3;
  // Per-sequence statistics (see the top); overrides global_balance. The sequences of each
  // forward come from set_sequences().
  bool sequence_balance = false;
  // Benchmark knob (bench.router_skew): added to expert 0's selection score only, like the
  // balancing bias (its weight and the gradients are untouched, so the maths stays exact);
  // >= 1 makes expert 0 take one slot of every token. 0 = off.
  double skew = 0.0;
};

class TopKRouter final : public Router {
 public:
  // W_r ~ U(-1/sqrt(d), 1/sqrt(d)) from seed (identical on every rank).
  TopKRouter(int64_t d_model, const TopKOptions& options, const comm::Communicator* comm,
             uint64_t seed);

  int64_t d_model() const override { return d_; }
  int n_experts() const override { return options_.n_experts; }
  int k() const override { return options_.k; }
  const TopKOptions& options() const { return options_; }

  void forward(ConstView x, RouteResult& out) override;
  // The slots and weights of forward() with no collective (the auxiliary losses and
  // expert_slots in `out` are this rank's own); no backward may follow. Local.
  void infer(ConstView x, RouteResult& out) override;
  void backward(ConstView dweight, float aux_scale, View dx) override;
  std::vector<ParamRef> params() override;
  std::vector<std::pair<std::string, View>> buffers() override;
  void end_step(bool applied) override;
  // sequence_balance: the sequences of the next forward()/infer() calls, as row offsets
  // [n_seq + 1] (0, ..., T); empty sequences are not counted. Local.
  void set_sequences(std::vector<int64_t> row0) { seq_row0_ = std::move(row0); }

  Tensor& w() { return w_; }
  Tensor& dw() { return dw_; }
  Tensor& bias() { return bias_; }  // [1, E], zero unless bias_balance
  // Slots routed to each expert (global) since the last end_step; bias_balance only.
  const std::vector<double>& pending_load() const { return load_; }

 private:
  int64_t d_;
  TopKOptions options_;
  const comm::Communicator* comm_;
  Tensor w_;                       // [d, E]
  Tensor dw_;                      // [d, E]
  Tensor bias_;                    // [1, E] selection bias b (bias_balance)
  std::vector<double> load_;       // [E] global routed slots since the last end_step
  std::vector<int64_t> seq_row0_;  // [n_seq + 1] sequence offsets (sequence_balance)
  // forward(), its statistics reduced over comm_ (global) or not (infer()).
  void run(ConstView x, RouteResult& out, bool global);
  struct Cache {
    ConstView x;                  // [T, d] borrowed input
    Tensor probs;                 // [T, E] softmax
    Tensor dlogits;               // [T, E] backward scratch
    std::vector<float> lse;       // [T] logsumexp of the logits
    std::vector<int32_t> expert;  // [T, k]
    std::vector<float> weight;    // [T, k]
    std::vector<double> f;        // [E] global slot fractions f_i
    std::vector<double> count;    // [E] global routed slots per expert
    double n_global = 0.0;        // N
    double balance_norm = 0.0;    // N (global), T * P (rank) or global n_seq (sequence)
    std::vector<double> seq_f;    // [n_seq, E] f_i^s / S_s (sequence scope)
    std::vector<int32_t> seq_of;  // [T] sequence of each token (sequence scope)
  } cache_;
};

}  // namespace moe::model
