// File: ffn.hpp — the dense feed-forward layer d -> f -> d (GELU or SwiGLU), no biases.
//
// Notation: N = B*T rows (tokens on this rank), d model width, f FFN width, f1 = f (GELU) or
// 2f (SwiGLU: gate and up side by side).
//
//   GELU:    y = gelu(x W1) W2                    W1 [d, f],  W2 [f, d]
//   SwiGLU:  y = (silu(x Wg) * (x Wu)) W2         W1 = [Wg | Wu] [d, 2f],  W2 [f, d]
// The activations are the experts' (model/layers/activation.hpp), so this layer computes what
// one expert of model/experts.hpp computes with the same weights. The GEMMs run on all BLIS
// threads from serial code; the element-wise work is an OpenMP loop over rows.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/experts.hpp"  // Activation
#include "model/params.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

class Ffn {
 public:
  // W1 ~ U(-1/sqrt(d), 1/sqrt(d)), W2 ~ U(-1/sqrt(f), 1/sqrt(f)), from (seed, name).
  Ffn(std::string name, int64_t d_model, int64_t d_ff, Activation activation, uint64_t seed);

  // x [N, d] -> y [N, d]. x must stay valid until backward(). Keeps h and a.
  void forward(ConstView x, View y);
  // dy [N, d] -> dx [N, d] (overwritten; may alias x). ACCUMULATES dW1, dW2.
  void backward(ConstView dy, View dx);

  int64_t d_model() const { return d_; }
  int64_t d_ff() const { return f_; }
  Activation activation() const { return act_; }
  View w1() { return w1_.view(); }
  View w2() { return w2_.view(); }
  // "<name>.w1" ([Wg | Wu] for SwiGLU), "<name>.w2".
  std::vector<ParamRef> params();
  void zero_grad();

 private:
  std::string name_;
  int64_t d_, f_, f1_;
  Activation act_;
  Tensor w1_, dw1_;  // [d, f1]
  Tensor w2_, dw2_;  // [f, d]
  ConstView x_;      // [N, d] borrowed input of the last forward
  Tensor h_;         // [N, f1] pre-activation; dL/dh in backward
  Tensor a_;         // [N, f] activation (input of W2)
  Tensor da_;        // [N, f] backward scratch dL/da
};

}  // namespace moe::model
