// File: router.hpp — the router interface: for each token, k (expert id, weight) slots.
//
// Notation: T = tokens on this rank, d = model width, E = experts (global), k = slots per token.
//
// Routers here: TopKRouter (topk, and topk_bias: loss-free bias balancing) and
// ExpertChoiceRouter (expert_choice). make_router() in model/layers/moe_layer.cpp picks one from
// model.moe.router.
//
// Every router (top-k softmax, expert-choice, a single gate computed once from early features,
// product-key retrieval over many tiny experts) answers the same question: for each local token,
// k slots of (global expert id, combine weight). A slot may be empty (id -1): expert-choice
// leaves tokens unchosen, product-key may return fewer than k hits. The router keeps in its own
// cache what its backward needs; the MoE layer only hands back dL/dweight per slot.
//
// Auxiliary losses (load balancing, z-loss, ...) are GLOBAL: each router reduces its statistics
// over its communicator before forming them, so their values are identical on every rank and
// independent of the number of ranks. backward() then adds the gradient of
// aux_scale * aux_loss with respect to this rank's tokens; summing the router's parameter
// gradients over ranks (the usual data-parallel all-reduce) gives the full gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "comm/plan.hpp"
#include "model/params.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

struct RouteResult {
  int64_t n_tokens = 0;               // T
  int k = 0;                          // slots per token
  std::vector<int32_t> expert;        // [T, k] global expert id, -1 = empty slot
  std::vector<float> weight;          // [T, k] combine weight (0 for an empty slot)
  std::vector<int64_t> expert_slots;  // [E] routed (non-empty) slots per expert, global
  std::vector<double> prob_sum;       // [E] sum over the global batch of the router probability
                                      // of each expert (for the KL(z || uniform) metric)
  double load_balance_loss = 0.0;     // unweighted, global
  double z_loss = 0.0;                // unweighted, global
  double aux_loss = 0.0;              // coefficient-weighted sum of the above: what enters L

  // The routing decision as the dispatch plan reads it (borrowed: valid while *this lives).
  comm::RoutingView routing() const {
    return comm::RoutingView{n_tokens, k, expert.data(), weight.data()};
  }
};

// p[0, E) <- softmax(p[0, E)) in place (fp32, max-shifted, sum in double); returns the
// logsumexp of the input logits.
inline double softmax_inplace(float* p, int E) {
  float m = p[0];
  for (int i = 1; i < E; ++i) m = std::max(m, p[i]);
  double s = 0.0;
  for (int i = 0; i < E; ++i) {
    p[i] = std::exp(p[i] - m);
    s += p[i];
  }
  const float inv = static_cast<float>(1.0 / s);
  for (int i = 0; i < E; ++i) p[i] *= inv;
  return m + std::log(s);
}

class Router {
 public:
  virtual ~Router() = default;
  virtual int64_t d_model() const = 0;
  virtual int n_experts() const = 0;
  // An upper bound of RouteResult::k (the layer reads the actual k from each RouteResult).
  virtual int k() const = 0;

  // x [T, d] -> out. Collective over the router's communicator (every rank calls, in the same
  // order, also with T = 0). x must stay valid until backward().
  virtual void forward(ConstView x, RouteResult& out) = 0;
  // dweight [T, k] = dL/dweight; aux_scale multiplies the auxiliary loss in L. ACCUMULATES
  // dx [T, d] += dL/dx and the parameter gradients. Local (no communication).
  virtual void backward(ConstView dweight, float aux_scale, View dx) = 0;
  // Inference (no backward follows): the routing of forward(). Routers whose statistics need no
  // collective for the routing itself override it to skip them (then local); the default is
  // forward() (collective).
  virtual void infer(ConstView x, RouteResult& out) { forward(x, out); }

  virtual std::vector<ParamRef> params() = 0;

  // Replicated state that is not trained by the optimiser but belongs in the checkpoint
  // (topk_bias: the balancing bias b [1, E]). Names are relative ("router.bias").
  virtual std::vector<std::pair<std::string, View>> buffers() { return {}; }
  // Called once per optimiser step, after the update (applied = false: the step was skipped).
  // Local; the statistics it uses are global, so every rank makes the same change.
  virtual void end_step(bool applied) { (void)applied; }
};

}  // namespace moe::model
