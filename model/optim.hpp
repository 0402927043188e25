// File: optim.hpp — AdamW with decoupled weight decay, the learning-rate schedule, and gradient
// clipping by a global norm.
//
// Notation: p parameter, g its gradient, m and v Adam's first and second moments, t the number
// of updates this parameter has had (1 on the first), lr the step's learning rate, wd weight
// decay. One update of one element (the PyTorch AdamW formulation):
//
//   p <- p * (1 - lr wd)                       only for parameters flagged to decay
//   m <- b1 m + (1 - b1) g
//   v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//
// The update is element-wise, so it is deterministic for any thread count. Nothing here
// communicates: the global norm comes from comm::global_grad_norm and is passed in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "model/params.hpp"
#include "runtime/config.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

struct AdamWOptions {
  double beta1 = 0.9;         // train.beta1
  double beta2 = 0.95;        // train.beta2
  double eps = 1e-8;          // train.eps
  double weight_decay = 0.1;  // train.weight_decay (decoupled: multiplied by lr)

  static AdamWOptions from(const Config& config);  // the train.* keys above
};

// Optimiser state of one parameter; m and v have the parameter's [rows, cols] shape.
struct AdamState {
  Tensor m;
  Tensor v;
  int64_t step = 0;  // updates applied so far
};

// True unless the name marks a norm gain or a bias ("norm" or "bias" anywhere in it, or a
// trailing ".b"/".g"): the usual rule that only weight matrices and embeddings decay.
bool decays_by_default(const std::string& name);

class AdamW {
 public:
  explicit AdamW(AdamWOptions options = {});

  // Registers a parameter (its value and grad views must outlive the optimiser) with zero
  // moments. Names must be unique. Returns its index.
  size_t add(const ParamRef& param, bool decay);
  size_t add(const ParamRef& param) { return add(param, decays_by_default(param.name)); }
  // The same, adopting a state (moments of the parameter's shape and its step count), e.g.
  // carried over from another optimiser when experts move (model/rebalance.hpp).
  size_t add(const ParamRef& param, bool decay, AdamState state);
  void add(const std::vector<ParamRef>& params) {
    for (const ParamRef& p : params) add(p);
  }

  // One update of every registered parameter from grad_scale x its gradient, with learning
  // rate lr: grad_scale is the clipping factor (clip_factor), applied inside the update's one
  // pass instead of a pass of its own; the gradients are left as they are. Gives bitwise the
  // update of clip_grad_norm (same float product g * scale) then step(lr). OpenMP inside (call
  // from serial code). Local.
  void step(double lr, float grad_scale = 1.0f);

  size_t size() const { return slots_.size(); }
  const ParamRef& param(size_t i) const { return slots_[i].param; }
  bool decay(size_t i) const { return slots_[i].decay; }
  AdamState& state(size_t i) { return slots_[i].state; }
  const AdamState& state(size_t i) const { return slots_[i].state; }
  // Index of the parameter with this name, or -1.
  int64_t find(const std::string& name) const;
  const AdamWOptions& options() const { return options_; }

 private:
  struct Slot {
    ParamRef param;
    bool decay;
    AdamState state;
  };
  AdamWOptions options_;
  std::vector<Slot> slots_;
};

// One AdamW update of one parameter (the formula above) from grad_scale x grad, t =
// state.step + 1 afterwards.
// Sparse form (rows != nullptr, a parameter with ParamRef::sparse_rows): only the listed rows
// change, weights, decay and moments alike; the others keep their values and their (stale)
// moments until a step touches them again. The bias correction uses the parameter's step
// count t, as PyTorch's SparseAdam does, so the state is still (m, v, t) and checkpoints are
// unchanged.
void adamw_update(View value, ConstView grad, AdamState& state, double lr, bool decay,
                  const AdamWOptions& options, const std::vector<int64_t>* rows = nullptr,
                  float grad_scale = 1.0f);

// Linear warmup then cosine decay, for optimiser step s = 0, 1, ... (0-based, the step being
// taken):
//   s <  warmup:           lr * (s + 1) / warmup
//   warmup <= s < total:   min_lr + (lr - min_lr) * (1 + cos(pi * q)) / 2,
//                          q = (s - warmup) / (total - warmup)
//   s >= total:            min_lr
// So the peak lr is reached at s = warmup - 1 and s = warmup, and the decay ends at total.
struct LrSchedule {
  double lr = 3e-4;            // train.lr (peak)
  double min_lr = 3e-5;        // train.min_lr
  int64_t warmup_steps = 100;  // train.warmup_steps
  int64_t total_steps = 1000;  // train.steps
  double at(int64_t step) const;
};

// The clipping factor min(1, max_norm / norm) as a float. max_norm <= 0 disables clipping; a
// norm that is zero or not finite gives 1 (the caller decides what to do with a NaN/Inf step).
// Local: `norm` is already global.
float clip_factor(double norm, double max_norm);

// Scales every gradient by clip_factor(norm, max_norm) and returns it. The training loop passes
// the factor to AdamW::step instead (one pass over the parameters, not two).
// `rows`, if not empty, has one entry per gradient: null, or the only rows that may be non-zero
// (ParamRef::sparse_rows), which are then the only rows scaled (the others stay exactly zero).
double clip_grad_norm(const std::vector<View>& grads, double norm, double max_norm,
                      const std::vector<const std::vector<int64_t>*>& rows = {});

}  // namespace moe::model
