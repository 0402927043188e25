// Expert re-placement and replication under training (model/rebalance.hpp): migrating experts
// away and back restores weights and AdamW state bit for bit; replicas stay identical over
// steps, and training with them gives the losses of training without (both exchange paths);
// a checkpoint carries the placement and load averages, and a model restored from it continues
// bit for bit; a checkpoint of another rank count or without them is refused with the reason.
#include "model/rebalance.hpp"
#include "tests/test_util.hpp"
#include "tests/tiny_model.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>

#include "comm/communicator.hpp"
#include "model/layers/moe_layer.hpp"
#include "model/model_checkpoint.hpp"
#include "runtime/checkpoint.hpp"

using moe::comm::Communicator;
using moe::comm::ExpertPlacement;
using moe::model::AdamW;
using moe::model::ExpertRebalancer;
using moe::model::ModelConfig;
using moe::model::RebalanceConfig;
using moe::model::Transformer;

namespace {

ModelConfig tiny(moe::model::ExchangeMode mode) {
  ModelConfig c = moe::test::tiny_model();
  c.moe.n_experts = 8;
  c.moe.exchange = mode;
  c.moe.router_skew = 1.0;  // expert 0 takes half of the slots: replicas get real work
  return c;
}

// One training step of the experts only (dense parameters stay: their gradients would need the
// all-reduce of the training loop): forward, backward, replica sum, AdamW. Returns the loss.
double step(Transformer& model, AdamW& opt, ExpertRebalancer* rb, const Communicator& comm,
            uint32_t seed) {
  const int64_t n_seq = 2 * comm.size(), seq_len = 8, per = 2;
  const auto data = moe::test::random_windows(n_seq, seq_len, model.config().vocab_size, seed);
  std::span<const int32_t> mine(data.data() + comm.rank() * per * (seq_len + 1),
                                static_cast<size_t>(per * (seq_len + 1)));
  model.zero_grad();
  const double loss = model.forward(mine, per, seq_len, double(n_seq * seq_len));
  model.backward(1.0f);
  if (rb) rb->sum_replica_grads(model);
  opt.step(1e-2);
  return comm.sum(loss) + model.stats().aux_loss;
}

AdamW expert_optimiser(Transformer& model) {
  AdamW opt;
  for (const auto& p : model.expert_params()) opt.add(p, true);
  return opt;
}

// Expert 0 on every rank (primary on rank `first`), the others on rank (e + shift) % P.
ExpertPlacement replicated(int E, int P, int first, int shift) {
  std::vector<std::vector<int>> ranks(static_cast<size_t>(E));
  ranks[0].push_back(first);
  for (int r = 0; r < P; ++r)
    if (r != first) ranks[0].push_back(r);
  for (int e = 1; e < E; ++e) ranks[static_cast<size_t>(e)] = {(e + shift) % P};
  return ExpertPlacement::from_instances(ranks, P);
}

struct Snapshot {
  std::vector<float> value, m, v;
  int64_t step;
};

std::map<std::string, Snapshot> snapshot(Transformer& model, AdamW& opt) {
  std::map<std::string, Snapshot> out;
  for (const auto& p : model.expert_params()) {
    const auto& st = opt.state(static_cast<size_t>(opt.find(p.name)));
    out[p.name] = {std::vector<float>(p.value.data, p.value.data + p.value.size()),
                   std::vector<float>(st.m.data(), st.m.data() + st.m.numel()),
                   std::vector<float>(st.v.data(), st.v.data() + st.v.numel()), st.step};
  }
  return out;
}

}  // namespace

TEST(Rebalance, MigrationRoundTripIsBitExact) {
  Communicator world = Communicator::world();
  const int P = world.size();
  Transformer model(tiny(moe::model::ExchangeMode::kAuto), world, 5);
  AdamW opt = expert_optimiser(model);
  step(model, opt, nullptr, world, 1);  // non-zero moments, step counts 1
  const auto before = snapshot(model, opt);
  ExpertRebalancer rb(RebalanceConfig{}, model, world);
  const ExpertPlacement home = ExpertPlacement::blocked(8, P);
  const ExpertPlacement away = replicated(8, P, P - 1, 1);
  const auto& ev = rb.apply(1, model, opt, {away, away});
  EXPECT_EQ(ev.layers_changed, 2);
  EXPECT_GT(ev.experts_moved, 0);
  EXPECT_EQ(ev.replicas, 2 * (P - 1));
  EXPECT_EQ(model.moe_layer(0)->experts().global_ids(), away.local_experts(world.rank()));
  rb.apply(2, model, opt, {home, home});
  EXPECT_FALSE(model.moe_layer(1)->placement().has_replicas());
  const auto after = snapshot(model, opt);
  ASSERT_EQ(after.size(), before.size());
  for (const auto& [name, s] : before) {
    ASSERT_TRUE(after.count(name)) << name;
    const Snapshot& a = after.at(name);
    EXPECT_TRUE(a.value == s.value) << name;
    EXPECT_TRUE(a.m == s.m) << name;
    EXPECT_TRUE(a.v == s.v) << name;
    EXPECT_EQ(a.step, s.step) << name;
  }
}

class RebalanceTraining : public testing::TestWithParam<moe::model::ExchangeMode> {};

TEST_P(RebalanceTraining, ReplicasStayIdenticalAndLossesMatch) {
  Communicator world = Communicator::world();
  const int P = world.size(), me = world.rank();
  const ModelConfig cfg = tiny(GetParam());
  Transformer plain(cfg, world, 9), moved(cfg, world, 9);
  AdamW opt_plain = expert_optimiser(plain), opt_moved = expert_optimiser(moved);
  ExpertRebalancer rb(RebalanceConfig{}, moved, world);
  const ExpertPlacement p = replicated(8, P, 0, 1);
  rb.apply(0, moved, opt_moved, {p, p});
  for (uint32_t s = 0; s < 3; ++s) {
    const double a = step(plain, opt_plain, nullptr, world, 10 + s);
    const double b = step(moved, opt_moved, &rb, world, 10 + s);
    EXPECT_NEAR(a, b, 1e-5 * std::abs(a)) << "step " << s;
    // Per-expert load statistics are placement independent.
    EXPECT_EQ(plain.moe_layer(0)->stats().load.expert_tokens,
              moved.moe_layer(0)->stats().load.expert_tokens);
  }
  // Every rank holds expert 0: its weights are bitwise the same everywhere, and close to the
  // unreplicated run's.
  for (int l = 0; l < 2; ++l) {
    moe::model::ExpertBank& bank = moved.moe_layer(l)->experts();
    const int slot = p.slot_on(0, me);
    ASSERT_GE(slot, 0);
    EXPECT_EQ(bank.is_replica(slot), me != 0);
    std::vector<float> w(bank.w1(slot).data, bank.w1(slot).data + bank.w1(slot).size());
    std::vector<float> lo = w, hi = w;
    world.allreduce_min(lo.data(), static_cast<int64_t>(lo.size()));
    world.allreduce_max(hi.data(), static_cast<int64_t>(hi.size()));
    EXPECT_TRUE(lo == w && hi == w) << "layer " << l;
  }
  // Replicas are left out of the parameters the norm and checkpoints count.
  int replica_params = 0;
  for (const auto& q : moved.expert_params()) replica_params += q.replica;
  EXPECT_EQ(replica_params, me == 0 ? 0 : 2 * 2);  // two layers x (w1, w2)
}

INSTANTIATE_TEST_SUITE_P(Exchange, RebalanceTraining,
                         testing::Values(moe::model::ExchangeMode::kAuto,
                                         moe::model::ExchangeMode::kAlltoallv));

namespace {

// A model under training with its rebalancer: expert and (never stepped) dense optimisers.
struct Trainee {
  Transformer model;
  AdamW experts, dense;
  ExpertRebalancer rb;
  Trainee(const ModelConfig& cfg, const RebalanceConfig& rc, const Communicator& w, uint64_t seed)
      : model(cfg, w, seed), experts(expert_optimiser(model)), rb(rc, model, w) {
    for (const auto& p : model.dense_params()) dense.add(p);
  }
  moe::model::CheckpointEntries entries(bool replicas) {
    return moe::model::checkpoint_entries(
        model,
        [&](const std::string& name) -> moe::model::AdamState& {
          const int64_t i = dense.find(name);
          return i >= 0 ? dense.state(static_cast<size_t>(i))
                        : experts.state(static_cast<size_t>(experts.find(name)));
        },
        replicas);
  }
  // Both layers to the replicated map of the tests above (primaries shifted by one rank).
  void move_away(const Communicator& w) {
    const ExpertPlacement away = replicated(8, w.size(), w.size() - 1, 1);
    rb.apply(0, model, experts, {away, away});
  }
  // One training step with load tracking and a possible re-placement after it. Returns the loss.
  double train_step(int64_t s, const Communicator& w) {
    const double loss = step(model, experts, &rb, w, 40 + static_cast<uint32_t>(s));
    rb.observe(model);
    rb.end_step(s, model, experts);
    return loss;
  }
};

RebalanceConfig rebalance_every(int64_t every, int replicas) {
  RebalanceConfig rc;
  rc.every = every;
  rc.plan.replicas = replicas;
  return rc;
}

}  // namespace

TEST(RebalanceCheckpoint, RestoredRunContinuesBitExactly) {
  Communicator world = Communicator::world();
  const ModelConfig cfg = tiny(moe::model::ExchangeMode::kAuto);
  const RebalanceConfig rc = rebalance_every(1, 1);
  Trainee a(cfg, rc, world, 21);
  a.move_away(world);
  for (int64_t s = 0; s < 3; ++s) a.train_step(s, world);

  std::string dir;
  if (world.rank() == 0) {
    std::string templ = (std::filesystem::temp_directory_path() / "moe-rbck-XXXXXX").string();
    dir = mkdtemp(templ.data());
  }
  world.broadcast(dir, 0);
  moe::checkpoint::Metadata meta;
  meta.step = 3;
  a.rb.save_state(meta.state);
  const auto saved = a.entries(false);
  moe::checkpoint::save(dir, saved.dense, saved.experts, meta, world);

  Trainee b(cfg, rc, world, 99);  // other initial weights: everything comes from the file
  EXPECT_EQ(b.rb.restore(moe::checkpoint::read_state(dir), b.model, b.experts), "");
  const auto load = b.entries(true);
  moe::checkpoint::load(dir, load.dense, load.experts, world);
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(b.rb.placement(i) == a.rb.placement(i)) << b.rb.placement(i).describe();
    EXPECT_TRUE(b.model.moe_layer(i)->placement() == a.model.moe_layer(i)->placement());
    EXPECT_EQ(b.model.moe_layer(i)->experts().global_ids(),
              a.model.moe_layer(i)->experts().global_ids());
  }
  EXPECT_EQ(b.rb.rebalances(), a.rb.rebalances());
  EXPECT_EQ(b.rb.replicas(), a.rb.replicas());
  EXPECT_EQ(b.rb.predicted_imbalance(), a.rb.predicted_imbalance());  // the same averages
  const auto sa = snapshot(a.model, a.experts), sb = snapshot(b.model, b.experts);
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [name, x] : sa) {  // replicas included: read from their owner's tensors
    ASSERT_TRUE(sb.count(name)) << name;
    EXPECT_TRUE(sb.at(name).value == x.value && sb.at(name).m == x.m && sb.at(name).v == x.v)
        << name;
    EXPECT_EQ(sb.at(name).step, x.step) << name;
  }
  // Tolerance 0: the same losses, re-placements and maps from here on.
  for (int64_t s = 3; s < 6; ++s) {
    EXPECT_EQ(a.train_step(s, world), b.train_step(s, world)) << "step " << s;
    EXPECT_EQ(a.rb.rebalances(), b.rb.rebalances()) << "step " << s;
    for (int i = 0; i < 2; ++i) EXPECT_TRUE(b.rb.placement(i) == a.rb.placement(i));
  }
  world.barrier();
  if (world.rank() == 0) std::filesystem::remove_all(dir);
}

TEST(RebalanceCheckpoint, RefusesOtherRankCountsAndMissingState) {
  Communicator world = Communicator::world();
  const int P = world.size();
  const ModelConfig cfg = tiny(moe::model::ExchangeMode::kAuto);
  const RebalanceConfig rc = rebalance_every(2, 0);
  Trainee a(cfg, rc, world, 21);
  a.move_away(world);
  moe::checkpoint::StateArrays state;
  a.rb.save_state(state);
  EXPECT_TRUE(ExpertRebalancer::saved(state));

  Trainee b(cfg, rc, world, 21);
  const ExpertPlacement blocked = ExpertPlacement::blocked(8, P);
  auto other = state;
  other.ints["rebalance.world_size"] = {P + 1};
  EXPECT_EQ(
      b.rb.restore(other, b.model, b.experts),
      "it was written by " + std::to_string(P + 1) + " rank(s), this run has " + std::to_string(P));
  EXPECT_EQ(b.rb.restore({}, b.model, b.experts), "the checkpoint holds no expert placement");
  other = state;
  other.ints["rebalance.layer1.instance_counts"].pop_back();
  EXPECT_EQ(b.rb.restore(other, b.model, b.experts),
            "its placement of block 1 is incomplete or not of 8 experts");
  for (int i = 0; i < 2; ++i) {  // nothing changed
    EXPECT_TRUE(b.rb.placement(i) == blocked);
    EXPECT_TRUE(b.model.moe_layer(i)->placement() == blocked);
  }
  EXPECT_EQ(b.rb.rebalances(), 0);
}
