// The whole MoE Transformer: the distributed loss and every gradient equal the single-rank
// result for the same global weights and tokens, and the loss gradient matches finite
// differences.
#include "model/transformer.hpp"
#include "tests/test_util.hpp"
#include "tests/tiny_model.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "comm/communicator.hpp"

using moe::comm::Communicator;
using moe::model::ModelConfig;
using moe::model::Transformer;

namespace {

ModelConfig tiny(int every_n, bool tie) {
  ModelConfig c = moe::test::tiny_model(every_n);
  c.tie_embeddings = tie;
  c.moe.aux_loss_coef = 0.01;
  c.moe.z_loss_coef = 0.001;
  return c;
}

// Loss and gradients by parameter name after one forward + backward of `global` sequences,
// this rank taking its contiguous share; dense gradients summed over ranks.
struct Result {
  double loss = 0;
  std::map<std::string, std::vector<float>> grads;
};

Result run(const ModelConfig& cfg, const Communicator& comm, const std::vector<int32_t>& global,
           int64_t n_seq, int64_t seq_len) {
  Transformer model(cfg, comm, 99);
  model.zero_grad();
  const int64_t per = n_seq / comm.size();
  std::span<const int32_t> mine(global.data() + comm.rank() * per * (seq_len + 1),
                                static_cast<size_t>(per * (seq_len + 1)));
  double loss = model.forward(mine, per, seq_len, static_cast<double>(n_seq * seq_len));
  model.backward(1.0f);
  Result r;
  r.loss = comm.sum(loss) + model.stats().aux_loss;
  for (const auto& p : model.dense_params()) {
    std::vector<float> g(p.grad.data, p.grad.data + p.grad.size());
    comm.allreduce_sum(g.data(), static_cast<int64_t>(g.size()));
    r.grads[p.name] = g;
  }
  for (const auto& p : model.expert_params())
    r.grads[p.name] = std::vector<float>(p.grad.data, p.grad.data + p.grad.size());
  return r;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 1e-12;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / scale;
}

}  // namespace

class TransformerDistributed : public testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(TransformerDistributed, EqualsSingleRank) {
  auto [every_n, tie] = GetParam();
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  ModelConfig cfg = tiny(every_n, tie);
  const int64_t n_seq = 4, seq_len = 8;
  auto data = moe::test::random_windows(n_seq, seq_len, cfg.vocab_size, 5);
  Result dist = run(cfg, world, data, n_seq, seq_len);
  Result single = run(cfg, self, data, n_seq, seq_len);
  EXPECT_NEAR(dist.loss, single.loss, 1e-5 * std::abs(single.loss));
  // Dense gradients (summed) on every rank; expert gradients where the expert lives.
  for (const auto& [name, g] : dist.grads) {
    ASSERT_TRUE(single.grads.count(name)) << name;
    EXPECT_LT(rel(g, single.grads[name]), 1e-5) << name;
  }
  // comm.exchange: auto (shared here, all ranks on one node) and alltoallv are bitwise equal.
  ModelConfig mpi_cfg = cfg;
  mpi_cfg.moe.exchange = moe::model::ExchangeMode::kAlltoallv;
  Result mpi = run(mpi_cfg, world, data, n_seq, seq_len);
  EXPECT_EQ(dist.loss, mpi.loss);
  for (const auto& [name, g] : dist.grads) EXPECT_TRUE(g == mpi.grads[name]) << name;
}

INSTANTIATE_TEST_SUITE_P(DenseAndMoe, TransformerDistributed,
                         testing::Values(std::make_tuple(0, true), std::make_tuple(1, true),
                                         std::make_tuple(2, false)));

TEST(Transformer, GradientMatchesFiniteDifferences) {
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  ModelConfig cfg = tiny(1, false);
  const int64_t n_seq = 2, seq_len = 6;
  auto data = moe::test::random_windows(n_seq, seq_len, cfg.vocab_size, 11);
  Transformer model(cfg, self, 3);
  auto total = [&] {
    double l = model.forward(data, n_seq, seq_len, double(n_seq * seq_len));
    return l + model.stats().aux_loss;
  };
  model.zero_grad();
  total();
  model.backward(1.0f);
  // Probe a few elements of several parameters, dense and expert, with central differences.
  std::vector<moe::model::ParamRef> params = model.dense_params();
  for (const auto& p : model.expert_params()) params.push_back(p);
  std::mt19937 rng(1);
  int checked = 0;
  for (const auto& p : params) {
    for (int probe = 0; probe < 2; ++probe) {
      int64_t i = static_cast<int64_t>(rng() % static_cast<uint32_t>(p.value.size()));
      float* w = p.value.data + i;  // parameters are contiguous
      const float analytic = p.grad.data[i];
      const float h = 1e-2f * std::max(1.0f, std::abs(*w));
      const float keep = *w;
      *w = keep + h;
      double up = total();
      *w = keep - h;
      double down = total();
      *w = keep;
      double numeric = (up - down) / (2.0 * h);
      // fp32 forward: the difference quotient carries ~1e-5 absolute noise; top-k routing is
      // piecewise smooth, and a probe that flips a routing decision would show as a large jump.
      EXPECT_NEAR(analytic, numeric, 2e-3 + 2e-2 * std::abs(numeric)) << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 20);
}
