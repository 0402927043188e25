// File: engine.hpp — the serving engine: continuous batching over per-sequence KV caches.
//
// Notation: B active sequences (B <= max_batch), V vocabulary, P ranks.
//
// Rank 0 owns the requests. Any thread may submit() a Request; only the engine thread (the one
// that called MPI_Init, running run()) touches the model or MPI. The active sequences are
// spread over the ranks: each rank holds ceil(max_batch / P) KV caches, and a new sequence goes
// to the rank with the most free caches (lowest rank on ties), so every rank runs the dense
// work (attention, router, LM head) of its share while the MoE exchange carries the tokens of
// all ranks to their experts. Each step, rank 0
//   1. drops cancelled requests and admits queued ones while fewer than max_batch are active;
//   2. broadcasts a step descriptor {kind, sequences, tokens} (kStep or kStop) and then, per
//      sequence, {owner rank, cache index, new tokens, fresh} followed by the token ids;
//   3. every rank runs one Transformer::extend over its sequences: new prompts (prefill; a
//      fresh cache is cleared first) and the latest tokens of the others (decode), so new
//      requests join the running batch between steps;
//   4. the logits rows [b_r, V] are gathered on rank 0 (rank order), which samples one token
//      per sequence with that request's RNG and finishes those that hit max_tokens, a stop
//      string, the context limit or a cancel (they leave; their cache returns to the pool).
// With spread = false rank 0 holds every sequence and the other ranks join each extend with no
// tokens (their experts serve rank 0's tokens). Greedy decoding gives the tokens of
// model::generate() (no KV cache) on the same rank count, up to float rounding of the cached
// attention (logits within 1e-4; tests/mpi/decode_test.cpp).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "model/generate.hpp"
#include "model/transformer.hpp"

namespace moe::model::serve {

struct EngineOptions {
  int max_batch = 8;          // sequences per decode step
  int64_t max_context = 256;  // positions per sequence (prompt + generated)
  int64_t max_queue = 1024;   // queued requests beyond which submit() refuses
  bool spread = true;         // sequences (and their dense work) over all ranks, or rank 0 only
  // Packed weights for decoding (Transformer::pack_for_inference); kBf16 rounds the model's
  // attention and expert weights to bf16 in place (moe-serve --weights bf16).
  WeightType weights = WeightType::kFp32;
};

enum class Finish { kNone, kLength, kStop, kCancelled };
const char* finish_name(Finish f);  // "length", "stop", "cancelled"

// One completion: input set before submit() and read-only after; output guarded by mu, with cv
// notified on every new token and when done.
struct Request {
  // Input.
  std::vector<int32_t> prompt;  // non-empty, shorter than max_context
  int64_t max_tokens = 16;      // prompt + max_tokens <= max_context
  SampleOptions sampling;
  std::vector<std::string> stop;  // stop strings (the text ends before the first match)

  // Output.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> tokens;  // generated ids
  std::string text;             // decoded text safe to show: never part of a stop string
  std::vector<size_t> marks;    // [tokens] text.size() once each token was added (streaming)
  Finish finish = Finish::kNone;
  bool done = false;

  // Set by the client side (a disconnected stream, say): the engine drops the request.
  std::atomic<bool> cancelled{false};
};

// Figures for /metrics (rank 0; a consistent snapshot).
struct EngineStats {
  int64_t requests = 0;  // submitted
  int64_t requests_done = 0;
  int64_t prompt_tokens = 0;
  int64_t tokens_generated = 0;
  int64_t queue_length = 0;
  int64_t batch_size = 0;  // active sequences in the last step
  int64_t steps = 0;
  double last_step_seconds = 0;
  double step_seconds_total = 0;
  double exchange_seconds_total = 0;  // rank 0's All2All time inside the steps
  // [MoE layers][E] slots routed to each expert (kept, over all ranks), cumulative since start;
  // expert_load_blocks[i] is the block of MoE layer i.
  std::vector<std::vector<int64_t>> expert_load;
  std::vector<int> expert_load_blocks;
};

class Engine {
 public:
  // decode turns ids into text (for stop strings); it is called on the engine thread only.
  // Allocates ceil(max_batch / P) caches of max_context positions on every rank (max_batch on
  // rank 0 without spread) and packs the model's expert weights for decoding
  // (Transformer::pack_for_inference(options.weights)).
  Engine(Transformer& model, const comm::Communicator& comm, const EngineOptions& options,
         std::function<std::string(const std::vector<int32_t>&)> decode);

  // Rank 0, any thread: queues the request. False (and the request untouched) once shutdown
  // has begun or the queue is full.
  bool submit(std::shared_ptr<Request> request);
  // Rank 0, any thread: stop accepting; run() finishes what is queued or active, then tells
  // the other ranks to stop and returns.
  void shutdown();
  bool accepting() const { return accepting_.load(); }

  // Every rank, the engine (MPI) thread: serves until shutdown. should_stop (polled on rank 0
  // about every 50 ms and between steps) starts a shutdown, e.g. on a signal. Collective.
  void run(const std::function<bool()>& should_stop = {});

  EngineStats stats() const;
  const EngineOptions& options() const { return options_; }

 private:
  struct Slot {
    std::shared_ptr<Request> req;
    int owner = 0;   // rank holding the cache
    int cache = -1;  // index into that rank's caches_
    std::mt19937_64 rng;
    bool prefilled = false;
  };
  void run_root(const std::function<bool()>& should_stop);
  void run_follower();
  // Every rank: receives the step payload (rank 0 has filled payload_), runs extend over this
  // rank's sequences and gathers the logits; on rank 0 row k of the result is the k-th sequence
  // in rank order (owner rank, then step order). Collective.
  ConstView step(int64_t n_seq, int64_t n_ids);
  // Samples, records and finishes; true when the sequence leaves the batch.
  bool advance(Slot& slot, ConstView logits);
  void finish(Slot& slot, Finish why);

  Transformer& model_;
  const comm::Communicator& comm_;
  EngineOptions options_;
  std::function<std::string(const std::vector<int32_t>&)> decode_;

  std::vector<SequenceCache> caches_;   // this rank's caches
  std::vector<std::vector<int>> free_;  // rank 0: [P] free cache indices of each rank
  std::vector<Slot> active_;
  // Step buffers, reused: [n_seq x kMeta] {owner, cache, n_new, fresh} then the ids.
  static constexpr int64_t kMeta = 4;
  std::vector<int64_t> payload_;
  std::vector<int32_t> local_ids_;
  std::vector<int64_t> local_n_;
  std::vector<SequenceCache*> local_caches_;
  std::vector<int64_t> rows_;    // [P] sequences on each rank this step
  std::vector<float> gathered_;  // rank 0: [n_seq, V] logits in rank order

  mutable std::mutex mu_;  // guards queue_, stats_
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Request>> queue_;
  std::atomic<bool> accepting_{true};
  EngineStats stats_;
};

}  // namespace moe::model::serve
