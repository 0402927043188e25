// File: tiny_model.hpp — the small model the MPI tests build on.
#pragma once

#include "model/transformer.hpp"

namespace moe::test {

// 2 blocks of d_model 16 (2 heads, dense d_ff 24), a vocabulary of 61, and an MoE layer of 4
// experts (top-2, d_ff 12) every `every_n` blocks: small enough for finite differences and
// many-rank runs on one machine, odd sizes so that no split happens to be even. Tests change
// what they vary on the returned config.
inline model::ModelConfig tiny_model(int every_n = 1) {
  model::ModelConfig c;
  c.vocab_size = 61;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 24;
  c.moe_every_n = every_n;
  c.moe.n_experts = 4;
  c.moe.top_k = 2;
  c.moe.d_ff = 12;
  return c;
}

}  // namespace moe::test
