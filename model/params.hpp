// File: params.hpp — named (value, gradient) pairs a layer exposes, and deterministic init.
//
// Weights are initialised from (seed, stream, element index) alone, with a counter-based hash,
// so a tensor's values do not depend on how many ranks exist or which rank holds it: experts
// use their GLOBAL id in the stream, which makes np=1 and np=4 hold the same global weights.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/hash.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

// A parameter and its gradient (same shape); the gradient is accumulated by backward().
struct ParamRef {
  std::string name;
  View value;
  View grad;
  // Row-sparse gradient (the PEER tables): only these rows of grad may be non-zero, and the
  // optimiser updates only them. nullptr: dense.
  const std::vector<int64_t>* sparse_rows = nullptr;
  // A replica instance of an expert (comm/placement.hpp, comm.rebalance.replicas): updated like
  // any parameter from the gradient summed over its instances, but the gradient norm and
  // checkpoints count only the primary instance.
  bool replica = false;
};

// A stream id from a tag and an index, e.g. init_stream("expert.w1", global_id).
uint64_t init_stream(const char* tag, int64_t index);

// Fills v with U(-bound, bound); element (i, j) depends only on (seed, stream, i * cols + j).
void init_uniform(View v, float bound, uint64_t seed, uint64_t stream);

}  // namespace moe::model
