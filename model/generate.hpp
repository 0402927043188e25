// File: generate.hpp — sampling and autoregressive generation over the expert-parallel model.
//
// Rank 0 holds the sequences; the other ranks take part in every forward with no tokens of
// their own (their experts still serve rank 0's tokens through the MoE exchange), so the dense
// work is done once, not once per rank. Without a KV cache each step recomputes the last
// `window` tokens (the model's training length), which is enough for a quick look at a model.
// Serving decodes incrementally instead (Transformer::extend over per-sequence KV caches,
// model/serve/engine.hpp) and gives the same tokens while the sequence fits in `window`.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "comm/communicator.hpp"
#include "model/transformer.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/config.hpp"
#include "runtime/tokenizer.hpp"

namespace moe::model {

struct SampleOptions {
  double temperature = 1.0;  // 0: greedy (argmax, ties to the lowest id)
  int top_k = 0;             // 0: no top-k cut
  double top_p = 1.0;        // nucleus: the smallest set of ids with probability >= top_p
  uint64_t seed = 0;
};

// Draws one id from logits [V] (a row view). Deterministic for a given rng state.
int32_t sample(ConstView logits, const SampleOptions& options, std::mt19937_64& rng);

// Extends `prompt` by up to max_new tokens (stopping early when stop(tokens) says so, checked
// on rank 0) and returns the new tokens on rank 0 (empty elsewhere). Collective over comm.
std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              int64_t max_new, int64_t window, const SampleOptions& options,
                              const comm::Communicator& comm,
                              const std::function<bool(const std::vector<int32_t>&)>& stop = {});

// A model restored from a checkpoint for inference: the configuration stored in it, the
// tokenizer of the token file it was trained on (or data_override), the Transformer with every
// dense weight and this rank's experts, and the checkpoint's metadata. No optimiser state is
// read. Collective over comm; every rank fails alike on a missing or unreadable checkpoint or
// token file.
struct LoadedModel {
  Config config;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Transformer> model;
  checkpoint::Metadata meta;
};
LoadedModel load_for_inference(const std::string& checkpoint_dir, const std::string& data_override,
                               const comm::Communicator& comm);

}  // namespace moe::model
