// File: router.hpp — the router interface: for each token, k (expert id, weight) slots.
//
// Notation: T = tokens on this rank, d = model width, E = experts (global), k = slots per token.
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

#include <cstdint>
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
  double load_balance_loss = 0.0;     // unweighted, global
  double z_loss = 0.0;                // unweighted, global
  double aux_loss = 0.0;              // coefficient-weighted sum of the above: what enters L

  // The routing decision as the dispatch plan reads it (borrowed: valid while *this lives).
  comm::RoutingView routing() const {
    return comm::RoutingView{n_tokens, k, expert.data(), weight.data()};
  }
};

class Router {
 public:
  virtual ~Router() = default;
  virtual int64_t d_model() const = 0;
  virtual int n_experts() const = 0;
  virtual int k() const = 0;

  // x [T, d] -> out. Collective over the router's communicator (every rank calls, in the same
  // order, also with T = 0). x must stay valid until backward().
  virtual void forward(ConstView x, RouteResult& out) = 0;
  // dweight [T, k] = dL/dweight; aux_scale multiplies the auxiliary loss in L. ACCUMULATES
  // dx [T, d] += dL/dx and the parameter gradients. Local (no communication).
  virtual void backward(ConstView dweight, float aux_scale, View dx) = 0;

  virtual std::vector<ParamRef> params() = 0;
};

}  // namespace moe::model
