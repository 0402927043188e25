// File: lm_head.hpp — the LM head (logits = x W^T) and the fused softmax cross-entropy.
//
// Notation: B sequences, T positions, N = B*T tokens on this rank, d model width, V vocabulary.
//
//   logits = x W^T                                   W [V, d] (own, or the embedding's: tied)
//   loss   = sum_n -log softmax(logits_n)[target_n] / n_norm
//   dlogits_n = (softmax(logits_n) - onehot(target_n)) / n_norm
// n_norm is given by the caller: the GLOBAL number of target tokens of the optimiser step, so
// that the loss and every gradient have the same scale on any rank count (summing the ranks'
// losses gives the global mean).
//
// Memory: one [N, V] buffer. forward() writes the logits into it and the cross-entropy turns
// them into dlogits in place, row by row (log-sum-exp with the row maximum subtracted, so huge
// logits neither overflow nor produce NaN), so no second [N, V] buffer exists.
//
// Tied weights: the head borrows the embedding's table and gradient, and backward ACCUMULATES
// into that gradient (dW += dlogits^T x) on top of the embedding's own scatter-add, so the one
// gradient holds both uses. A tied head reports no parameters of its own.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "model/layers/embedding.hpp"
#include "model/params.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

// Turns logits [N, V] into dlogits in place and returns the summed loss / normaliser; row_loss
// [N] receives each row's unnormalised loss (reused buffer). A target < 0 is ignored (its row
// contributes no loss and gets a zero gradient); a target
// >= V throws a data Error naming it. OpenMP over rows; the loss is summed in row order.
double softmax_cross_entropy(View logits, std::span<const int32_t> targets, double normaliser,
                             std::vector<double>& row_loss);

class LmHead {
 public:
  // Untied: own W ~ U(-1/sqrt(d), 1/sqrt(d)), from (seed, name).
  LmHead(std::string name, int64_t vocab_size, int64_t d_model, uint64_t seed);
  // Tied to the embedding's table (which must outlive the head).
  LmHead(std::string name, Embedding& tied);

  // x [N, d] -> logits [N, V] (the head's buffer, valid until the next call). For generation
  // and evaluation; keeps nothing for backward.
  ConstView logits(ConstView x);
  // logits() that also keeps x (borrowed) for backward(), for a loss computed by the caller
  // (the single-gate ensemble): the caller overwrites the returned [N, V] logits with dL/dlogits
  // before backward().
  View logits_for_backward(ConstView x);
  // x [N, d], targets [N] -> loss (sum / normaliser). Keeps x (borrowed: must stay valid until
  // backward) and dlogits for backward.
  double forward(ConstView x, std::span<const int32_t> targets, double normaliser);
  // dx [N, d] (overwritten). ACCUMULATES dW (the embedding's gradient when tied).
  void backward(View dx);

  // Per-token loss [N] of the last forward (unnormalised; 0 for ignored targets).
  const std::vector<double>& token_losses() const { return row_loss_; }
  bool tied() const { return tied_; }
  int64_t vocab_size() const { return v_; }
  int64_t d_model() const { return d_; }
  View weight() const { return w_; }
  View grad() const { return dw_; }
  // Untied: "<name>.weight"; tied: nothing (the embedding reports the shared table).
  std::vector<ParamRef> params();
  void zero_grad();
  int64_t cache_bytes() const { return logits_.numel() * 4; }

 private:
  std::string name_;
  int64_t v_, d_;
  bool tied_;
  Tensor own_w_, own_dw_;         // [V, d] (untied only)
  View w_, dw_;                   // [V, d] the table in use and its gradient
  ConstView x_;                   // [N, d] borrowed input of the last forward
  Tensor logits_;                 // [N, V] logits, then dlogits
  std::vector<double> row_loss_;  // [N] per-token loss of the last forward
};

}  // namespace moe::model
