// The single-gate MoE (model/single_gate): a sequence's tokens all reach one expert, in order,
// on every rank count; the distributed loss and every gradient equal the single-rank result in
// each phase; gradients match finite differences; early exit with threshold 0 skips the
// exchange entirely.
#include "model/single_gate.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "comm/communicator.hpp"

using moe::ConstView;
using moe::comm::Communicator;
using moe::model::ModelConfig;
using moe::model::SingleGateConfig;
using moe::model::SingleGateModel;
using Phase = moe::model::SingleGatePhase;

namespace {

ModelConfig tiny(bool tie) {
  ModelConfig c;
  c.vocab_size = 23;
  c.d_model = 8;
  c.n_layers = 3;
  c.n_heads = 2;
  c.d_ff = 12;
  c.tie_embeddings = tie;
  c.moe.n_experts = 4;
  return c;
}

SingleGateConfig sg(double ensemble = 0.5, bool freeze_base = true) {
  SingleGateConfig s;
  s.shared_layers = 1;
  s.ensemble = ensemble;
  s.freeze_base = freeze_base;
  return s;
}

struct Result {
  double loss = 0;
  std::map<std::string, std::vector<float>> grads;
  std::map<int, std::vector<float>> received;  // by global expert id
  std::vector<int32_t> routed;                 // global, in sequence order
};

constexpr int64_t kSeq = 8, kLen = 5;

// One forward + backward of the kSeq global sequences, this rank taking its contiguous share.
Result run(const ModelConfig& cfg, const SingleGateConfig& s, const Communicator& comm, Phase phase,
           const std::vector<int32_t>& global, const std::vector<int32_t>& forced) {
  SingleGateModel model(cfg, s, comm, 7);
  const int64_t per = kSeq / comm.size(), first = comm.rank() * per;
  if (!forced.empty())
    model.force_experts(std::vector<int32_t>(forced.begin() + first, forced.begin() + first + per));
  model.zero_grad();
  std::span<const int32_t> mine(global.data() + first * (kLen + 1),
                                static_cast<size_t>(per * (kLen + 1)));
  const double norm = phase == Phase::kGate ? double(kSeq) : double(kSeq * kLen);
  double loss = model.forward(phase, mine, per, kLen, norm);
  model.backward();
  Result r;
  r.loss = comm.sum(loss);
  for (const auto& p : model.all_dense_params()) {
    std::vector<float> g(p.grad.data, p.grad.data + p.grad.size());
    comm.allreduce_sum(g.data(), static_cast<int64_t>(g.size()));
    r.grads[p.name] = g;
  }
  for (const auto& p : model.expert_params())
    r.grads[p.name] = std::vector<float>(p.grad.data, p.grad.data + p.grad.size());
  if (phase == Phase::kExperts)
    for (int i = 0; i < model.n_local(); ++i) {
      ConstView v = model.received(i);
      r.received[model.placement().local_experts(comm.rank())[static_cast<size_t>(i)]] =
          std::vector<float>(v.data, v.data + v.size());
    }
  std::vector<int32_t> routed(static_cast<size_t>(kSeq), 0);
  if (phase != Phase::kBase) {  // kBase has no gate
    for (int64_t b = 0; b < per; ++b)
      routed[static_cast<size_t>(first + b)] = model.routed()[static_cast<size_t>(b)];
    comm.allreduce_sum(routed.data(), kSeq);
  }
  r.routed = routed;
  return r;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return 1e9;
  double diff = 0, scale = 1e-12;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / scale;
}

void expect_same(const Result& dist, Result& single) {
  EXPECT_NEAR(dist.loss, single.loss, 1e-5 * std::abs(single.loss));
  for (const auto& [name, g] : dist.grads) {
    ASSERT_TRUE(single.grads.count(name)) << name;
    EXPECT_LT(rel(g, single.grads[name]), 1e-5) << name;
  }
}

}  // namespace

// (phase, tied embeddings, freeze_base)
class SingleGateDistributed : public testing::TestWithParam<std::tuple<Phase, bool, bool>> {};

TEST_P(SingleGateDistributed, EqualsSingleRank) {
  auto [phase, tie, freeze] = GetParam();
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const ModelConfig cfg = tiny(tie);
  auto data = moe::test::random_windows(kSeq, kLen, cfg.vocab_size, 5);
  Result dist = run(cfg, sg(0.5, freeze), world, phase, data, {});
  Result single = run(cfg, sg(0.5, freeze), self, phase, data, {});
  expect_same(dist, single);
  EXPECT_EQ(dist.routed, single.routed);
}

INSTANTIATE_TEST_SUITE_P(Phases, SingleGateDistributed,
                         testing::Values(std::make_tuple(Phase::kBase, true, true),
                                         std::make_tuple(Phase::kExperts, true, true),
                                         std::make_tuple(Phase::kExperts, true, false),
                                         std::make_tuple(Phase::kExperts, false, false),
                                         std::make_tuple(Phase::kGate, false, true)));

// Forced routing, uneven (expert 2 gets none, expert 0 half): each expert receives exactly its
// sequences' rows, whole and in global sequence order, on every rank count.
TEST(SingleGate, SequencesReachOneExpertWhole) {
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const ModelConfig cfg = tiny(true);
  auto data = moe::test::random_windows(kSeq, kLen, cfg.vocab_size, 9);
  const std::vector<int32_t> forced = {0, 3, 0, 1, 0, 3, 0, 1};
  Result dist = run(cfg, sg(), world, Phase::kExperts, data, forced);
  Result single = run(cfg, sg(), self, Phase::kExperts, data, forced);
  EXPECT_EQ(dist.routed, forced);
  const int64_t row = kLen * cfg.d_model;
  for (const auto& [gid, rows] : dist.received) {
    int64_t n = 0;
    for (int32_t e : forced) n += e == gid;
    EXPECT_EQ(static_cast<int64_t>(rows.size()), n * row) << "expert " << gid;
    EXPECT_LT(rel(rows, single.received[gid]), 1e-5) << "expert " << gid;
  }
  expect_same(dist, single);
}

TEST(SingleGate, EarlyExitThresholdZeroSkipsTheExchange) {
  Communicator world = Communicator::world();
  const ModelConfig cfg = tiny(true);
  auto data = moe::test::random_windows(kSeq, kLen, cfg.vocab_size, 3);
  const int64_t per = kSeq / world.size();
  std::span<const int32_t> mine(data.data() + world.rank() * per * (kLen + 1),
                                static_cast<size_t>(per * (kLen + 1)));
  const double norm = double(kSeq * kLen);
  // Threshold 1: nobody exits; score() equals the training forward's loss.
  SingleGateConfig keep = sg();
  keep.exit_threshold = 1.0;
  SingleGateModel full(cfg, keep, world, 7);
  const double scored = world.sum(full.score(mine, per, kLen, norm));
  EXPECT_EQ(full.stats().exchanges, 1);
  EXPECT_EQ(full.stats().exited, 0);
  const double trained = world.sum(full.forward(Phase::kExperts, mine, per, kLen, norm));
  EXPECT_NEAR(scored, trained, 1e-6 * std::abs(trained));
  // Threshold 0: every sequence exits, no plan and no exchange; the loss is the base branch's
  // alone (what ensemble = 1 scores without exits).
  SingleGateConfig exit_all = sg();
  exit_all.exit_threshold = 0.0;
  SingleGateModel early(cfg, exit_all, world, 7);
  const double early_loss = world.sum(early.score(mine, per, kLen, norm));
  EXPECT_EQ(early.stats().exchanges, 0);
  EXPECT_EQ(early.stats().bytes_sent, 0);
  EXPECT_EQ(early.stats().exchange_seconds, 0.0);
  EXPECT_EQ(early.stats().exited, per);
  SingleGateConfig base_only = sg(1.0);
  base_only.exit_threshold = 1.0;
  SingleGateModel base(cfg, base_only, world, 7);
  const double base_loss = world.sum(base.score(mine, per, kLen, norm));
  EXPECT_NEAR(early_loss, base_loss, 1e-6 * std::abs(base_loss));
}

// (phase, ensemble, freeze_base); only the trained parameters are checked.
class SingleGateGradient : public testing::TestWithParam<std::tuple<Phase, double, bool>> {};

TEST_P(SingleGateGradient, MatchesFiniteDifferences) {
  auto [phase, ensemble, freeze] = GetParam();
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const ModelConfig cfg = tiny(false);
  const int64_t n_seq = 4;
  auto data = moe::test::random_windows(n_seq, kLen, cfg.vocab_size, 11);
  SingleGateModel model(cfg, sg(ensemble, freeze), self, 3);
  const std::vector<int32_t> forced = {2, 0, 2, 3};
  if (phase == Phase::kExperts) model.force_experts(forced);
  const double norm = phase == Phase::kGate ? double(n_seq) : double(n_seq * kLen);
  auto total = [&] { return model.forward(phase, data, n_seq, kLen, norm); };
  model.zero_grad();
  total();
  model.backward();
  std::vector<moe::model::ParamRef> params = model.dense_params(phase);
  if (phase == Phase::kExperts)
    for (const auto& p : model.expert_params()) params.push_back(p);
  std::mt19937 rng(1);
  int checked = 0;
  for (const auto& p : params) {
    for (int probe = 0; probe < 2; ++probe) {
      int64_t i = static_cast<int64_t>(rng() % static_cast<uint32_t>(p.value.size()));
      float* w = p.value.data + i;
      const float analytic = p.grad.data[i];
      // Embedding rows are small (std 0.02) and RMS-normalised: a small step keeps it linear.
      const float h = 2e-3f * std::max(1.0f, std::abs(*w));
      const float keep = *w;
      *w = keep + h;
      const double up = total();
      *w = keep - h;
      const double down = total();
      *w = keep;
      const double numeric = (up - down) / (2.0 * h);
      EXPECT_NEAR(analytic, numeric, 2e-3 + 2e-2 * std::abs(numeric)) << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GE(checked, phase == Phase::kGate ? 4 : 20);
}

INSTANTIATE_TEST_SUITE_P(Phases, SingleGateGradient,
                         testing::Values(std::make_tuple(Phase::kBase, 0.5, true),
                                         std::make_tuple(Phase::kExperts, 0.5, true),
                                         std::make_tuple(Phase::kExperts, 0.5, false),
                                         std::make_tuple(Phase::kExperts, 0.0, false),
                                         std::make_tuple(Phase::kGate, 0.3, true)));
