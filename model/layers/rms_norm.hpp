// File: rms_norm.hpp — RMSNorm with a learned gain (no bias, no mean subtraction).
//
// Notation: N = B*T rows (tokens on this rank), d model width.
//
//   r_n = 1 / sqrt(mean_j x[n, j]^2 + eps)      y[n, j] = g[j] x[n, j] r_n        g [d]
// Backward, with s_n = (1/d) sum_j g[j] dy[n, j] x[n, j]:
//   dx[n, j] = r_n (g[j] dy[n, j] - x[n, j] r_n^2 s_n)      dg[j] += sum_n dy[n, j] x[n, j] r_n
// dg is summed over rows in row order, parallel over column blocks, so it does not depend on the
// thread count. The gain starts at 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/params.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

class RmsNorm {
 public:
  RmsNorm(std::string name, int64_t d_model, float eps = 1e-5f);

  // x [N, d] -> y [N, d] (y must not alias x). x must stay valid until backward(). Keeps r [N].
  void forward(ConstView x, View y);
  // dy [N, d] -> dx [N, d] (overwritten; may alias dy). ACCUMULATES dg.
  void backward(ConstView dy, View dx);

  int64_t d_model() const { return d_; }
  float eps() const { return eps_; }
  View gain() { return g_.view(); }
  View gain_grad() { return dg_.view(); }
  // "<name>.gain" (no weight decay: the optimiser decides by the name's suffix).
  std::vector<ParamRef> params();
  void zero_grad() { dg_.zero(); }

 private:
  std::string name_;
  int64_t d_;
  float eps_;
  Tensor g_, dg_;  // [1, d]
  ConstView x_;    // [N, d] borrowed input of the last forward
  Tensor rstd_;    // [N] r_n of the last forward
};

}  // namespace moe::model
