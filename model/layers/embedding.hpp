// File: embedding.hpp — token embedding: a lookup table of rows, one per vocabulary entry.
//
// Notation: B sequences, T positions, N = B*T tokens on this rank, V vocabulary, d model width.
//
//   forward   y[n, :] = W[id_n, :]                  W [V, d], ids [N], y [N, d]
//   backward  dW[id_n, :] += dy[n, :]               (scatter-add, deterministic)
// The backward is parallel over column blocks of d: each thread owns whole columns of dW and
// adds the tokens in their order, so there are no races and the sums do not depend on the
// thread count. The LM head may share W (tied weights); its backward then accumulates into the
// same gradient (model/layers/lm_head.hpp).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "model/params.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

class Embedding {
 public:
  // W ~ U(-a, a) with a = 0.02 sqrt(3) (standard deviation 0.02), from (seed, name).
  Embedding(std::string name, int64_t vocab_size, int64_t d_model, uint64_t seed);

  // ids [N] -> y [N, d]. Throws a data Error naming the id, its position and V when an id is
  // outside [0, V). Keeps a copy of the ids for backward. Local; OpenMP inside.
  void forward(std::span<const int32_t> ids, View y);
  // dy [N, d]: ACCUMULATES dW. No input gradient (ids are discrete).
  void backward(ConstView dy);

  int64_t vocab_size() const { return v_; }
  int64_t d_model() const { return d_; }
  View weight() { return w_.view(); }
  View grad() { return dw_.view(); }
  // "<name>.weight".
  std::vector<ParamRef> params();
  void zero_grad() { dw_.zero(); }

 private:
  std::string name_;
  int64_t v_, d_;
  Tensor w_, dw_;             // [V, d]
  std::vector<int32_t> ids_;  // [N] ids of the last forward
};

}  // namespace moe::model
