// File: expert_choice.hpp — the expert-choice router (Zhou et al. 2022): experts pick tokens.
//
// Notation: T tokens on this rank, N tokens over all ranks (the layer's global batch of this
// call), d model width, E experts, c tokens per expert, P ranks.
//
//   logits = x W_r              [T, E]  fp32 (W_r [d, E], replicated on every rank)
//   S      = softmax(logits)    [T, E]  over the experts of each token
//   c      = min(N, ceil(N * C / E))    C = model.moe.capacity_factor, or model.moe.top_k when
//                                       that is 0 (then c = N k / E: top-k's compute budget)
//   expert i takes the c tokens of the GLOBAL batch with the largest S_ti; equal scores: the
//   lower global token index wins (rank r's tokens follow those of ranks < r). A token gets
//   0..E experts; weight = S_ti of each chosen (token, expert). No auxiliary loss (every expert
//   gets exactly c tokens); aux_loss = load_balance_loss = z_loss = 0.
//
// Result form (compact): token t's chosen experts fill its first slots in increasing expert id,
// the rest are empty (-1); k = the largest number of experts any LOCAL token got (>= 1), so k
// may differ between ranks and calls (the dispatch plan handles any k per rank in dropless
// mode; the layer plans expert-choice routing dropless since the router already applied the
// capacity).
//
// The global top-c without gathering the scores: a radix selection on the fp32 bit patterns
// (the scores are >= 0, so their bits order like the values). Four rounds, one per byte from the
// top: each rank histograms the byte of its scores that match the prefix found so far, per
// expert (E x 256 counts), one all-reduce sums the histograms, and every rank walks them down
// from 255 to the byte where the running count reaches the number still needed. After four
// rounds every rank knows each expert's c-th largest score v_i exactly and how many tokens
// scoring exactly v_i to take; one all-reduce of a [P, E] table of local tie counts then
// places each rank's ties in global token order. Cost per call: 5 all-reduces, 4 x E x 256 + P
// x E + 2E + 1 doubles in all (~16 KB per round for E = 8), independent of N, and 4 passes over
// the local [T, E] scores; gathering the scores would move N x E floats to every rank.
//
// Backward: dL/dS_ti = dweight of the chosen (t, i) slot (0 elsewhere: the choice is piecewise
// constant), then the softmax Jacobian into the logits, x and W_r.
//
// Expert choice looks at the other tokens of the batch: a token's experts depend on what the
// rest of the batch scores, so it suits training and batched scoring, not causal decoding.
#pragma once

#include "comm/communicator.hpp"
#include "model/routers/router.hpp"

namespace moe::model {

struct ExpertChoiceOptions {
  int n_experts = 8;
  double capacity = 2.0;  // C: average experts per token; c = min(N, ceil(N C / E))
};

class ExpertChoiceRouter final : public Router {
 public:
  // W_r ~ U(-1/sqrt(d), 1/sqrt(d)) from seed (identical on every rank; the same stream as the
  // top-k router, so both start from the same router weights).
  ExpertChoiceRouter(int64_t d_model, const ExpertChoiceOptions& options,
                     const comm::Communicator* comm, uint64_t seed);

  int64_t d_model() const override { return d_; }
  int n_experts() const override { return options_.n_experts; }
  int k() const override { return options_.n_experts; }
  const ExpertChoiceOptions& options() const { return options_; }
  // c of the last forward (tokens per expert, global).
  int64_t capacity() const { return capacity_; }

  void forward(ConstView x, RouteResult& out) override;
  void backward(ConstView dweight, float aux_scale, View dx) override;
  std::vector<ParamRef> params() override;

  Tensor& w() { return w_; }
  Tensor& dw() { return dw_; }

 private:
  int64_t d_;
  ExpertChoiceOptions options_;
  const comm::Communicator* comm_;
  Tensor w_;   // [d, E]
  Tensor dw_;  // [d, E]
  int64_t capacity_ = 0;
  struct Cache {
    ConstView x;                  // [T, d] borrowed input
    Tensor probs;                 // [T, E] softmax S
    Tensor dlogits;               // [T, E] backward scratch
    int k = 0;                    // slots per token of the last result
    std::vector<int32_t> expert;  // [T, k]
  } cache_;
};

}  // namespace moe::model
