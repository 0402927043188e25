// The serving engine: greedy completions of several concurrent requests (joining and leaving
// the batch at different steps, with a batch smaller than the number of requests) equal
// model::generate() without a KV cache, token for token, both against generate() on the same
// rank count and against a single-rank model (rank 0 alone with every expert). Stop strings
// cut the text and end the request; a cancelled request leaves the batch. The per-expert load
// counts every routed slot. Runs on 1, 2 and 4 ranks.
#include "model/serve/engine.hpp"
#include "tests/tiny_model.hpp"

#include <gtest/gtest.h>

#include <thread>

#include "comm/communicator.hpp"

using moe::comm::Communicator;
using moe::model::ModelConfig;
using moe::model::SampleOptions;
using moe::model::Transformer;
using moe::model::serve::Engine;
using moe::model::serve::EngineOptions;
using moe::model::serve::Finish;
using moe::model::serve::Request;

namespace {

ModelConfig tiny() {
  ModelConfig c = moe::test::tiny_model();
  c.d_model = 32;
  c.moe.d_ff = 16;
  return c;
}

// Tokens as letters, so stop strings can be tested.
std::string letters(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t t : ids) s += static_cast<char>('A' + t % 26);
  return s;
}

std::vector<std::vector<int32_t>> prompts() {
  return {{1, 2, 3}, {7, 7, 9, 11, 40, 2, 5, 3}, {30}, {12, 44, 5, 17, 8}, {60, 0}};
}
const std::vector<int64_t> kMaxTokens = {12, 5, 20, 9, 14};

// Greedy generate() for every prompt, on comm (every rank of comm calls).
std::vector<std::vector<int32_t>> reference(Transformer& model, const Communicator& comm) {
  std::vector<std::vector<int32_t>> out;
  SampleOptions greedy;
  greedy.temperature = 0;
  const auto ps = prompts();
  for (size_t i = 0; i < ps.size(); ++i)
    out.push_back(moe::model::generate(model, ps[i], kMaxTokens[i], 64, greedy, comm));
  return out;
}

// spread: sequences on every rank (each runs its share's dense work) or on rank 0 only.
void greedy_equals_generate(bool spread) {
  Communicator world = Communicator::world();
  const bool root = world.rank() == 0;
  Transformer model(tiny(), world, 21);
  const auto want = reference(model, world);
  std::vector<std::vector<int32_t>> want_single;
  Communicator self = world.split(world.rank(), 0);
  if (root) {
    Transformer alone(tiny(), self, 21);
    want_single = reference(alone, self);
  }

  EngineOptions eo;
  eo.max_batch = 3;  // fewer slots than requests: some wait, then join a running batch
  eo.max_context = 40;
  eo.spread = spread;
  Engine engine(model, world, eo, letters);
  std::vector<std::shared_ptr<Request>> reqs;
  std::thread client;
  if (root) {
    client = std::thread([&] {
      const auto ps = prompts();
      for (size_t i = 0; i < ps.size(); ++i) {
        auto r = std::make_shared<Request>();
        r->prompt = ps[i];
        r->max_tokens = kMaxTokens[i];
        r->sampling.temperature = 0;
        reqs.push_back(r);
        EXPECT_TRUE(engine.submit(r));
        if (i == 1) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      for (auto& r : reqs) {
        std::unique_lock<std::mutex> lock(r->mu);
        r->cv.wait(lock, [&] { return r->done; });
      }
      engine.shutdown();
      auto late = std::make_shared<Request>();
      late->prompt = {1};
      EXPECT_FALSE(engine.submit(late));
    });
  }
  engine.run();
  if (!root) return;
  client.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(reqs[i]->tokens, want[i]) << "request " << i;
    EXPECT_EQ(reqs[i]->tokens, want_single[i]) << "request " << i << " vs one rank";
    EXPECT_EQ(reqs[i]->finish, Finish::kLength);
    EXPECT_EQ(reqs[i]->text, letters(want[i]));
  }
  const auto st = engine.stats();
  EXPECT_EQ(st.requests, 5);
  EXPECT_EQ(st.requests_done, 5);
  int64_t total = 0;
  for (int64_t m : kMaxTokens) total += m;
  EXPECT_EQ(st.tokens_generated, total);
  // Per-expert load: every token through the model (each prompt once, then all but the last
  // generated token) routes top_k slots in every MoE layer.
  int64_t through = 0;
  for (size_t i = 0; i < prompts().size(); ++i)
    through += static_cast<int64_t>(prompts()[i].size()) + kMaxTokens[i] - 1;
  ASSERT_EQ(st.expert_load.size(), 2u);
  EXPECT_EQ(st.expert_load_blocks, (std::vector<int>{0, 1}));
  for (const auto& layer : st.expert_load) {
    ASSERT_EQ(layer.size(), 4u);
    int64_t slots = 0;
    for (int64_t n : layer) slots += n;
    EXPECT_EQ(slots, through * tiny().moe.top_k);
  }
}

TEST(Engine, GreedyEqualsGenerate) {
  greedy_equals_generate(true);
}
TEST(Engine, GreedyEqualsGenerateRankZeroOnly) {
  greedy_equals_generate(false);
}

TEST(Engine, StopStringAndCancel) {
  Communicator world = Communicator::world();
  const bool root = world.rank() == 0;
  Transformer model(tiny(), world, 21);
  SampleOptions greedy;
  greedy.temperature = 0;
  const std::vector<int32_t> prompt = {1, 2, 3};
  const auto full = moe::model::generate(model, prompt, 20, 64, greedy, world);
  EngineOptions eo;
  eo.max_batch = 2;
  eo.max_context = 40;
  // Stop at the text of generated tokens 4..5: the text ends before them (rank 0 holds it).
  const std::string text = letters(full);
  const std::string stop = root ? text.substr(4, 2) : std::string("-");
  auto stop_req = std::make_shared<Request>();
  stop_req->prompt = prompt;
  stop_req->max_tokens = 20;
  stop_req->sampling = greedy;
  stop_req->stop = {stop};
  auto cancel_req = std::make_shared<Request>();
  cancel_req->prompt = prompt;
  cancel_req->max_tokens = 30;
  cancel_req->sampling = greedy;
  // The client cancels after 3 tokens: done from decode, which runs on the engine thread after
  // each token, so the test does not race the (fast) engine.
  Engine engine(model, world, eo, [&](const std::vector<int32_t>& ids) {
    if (cancel_req->tokens.size() >= 3) cancel_req->cancelled.store(true);
    return letters(ids);
  });
  std::thread client;
  if (root) {
    client = std::thread([&] {
      EXPECT_TRUE(engine.submit(stop_req));
      EXPECT_TRUE(engine.submit(cancel_req));
      for (auto& r : {stop_req, cancel_req}) {
        std::unique_lock<std::mutex> lock(r->mu);
        r->cv.wait(lock, [&] { return r->done; });
      }
      engine.shutdown();
    });
  }
  engine.run();
  if (!root) return;
  client.join();
  EXPECT_EQ(stop_req->finish, Finish::kStop);
  EXPECT_EQ(stop_req->text, text.substr(0, text.find(stop)));
  EXPECT_EQ(cancel_req->finish, Finish::kCancelled);
  EXPECT_LE(cancel_req->tokens.size(), 4u);
}

}  // namespace
