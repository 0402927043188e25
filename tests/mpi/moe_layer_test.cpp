// MoeLayer distributed == single rank: for the same global weights and global tokens, the
// output, input gradient and every weight gradient on np = 1, 2, 4 equal a single-rank reference
// computed inside the same test on a self-communicator (relative error < 1e-5), in dropless,
// capacity and pipelined modes, GELU and SwiGLU, and under degenerate loads (every token to
// one expert, experts with nothing, a rank with no tokens). Every case runs the distributed
// layer with every exchange (comm.exchange alltoallv, and, where they apply (no pipelining),
// shared on one node and hierarchical on a forced layout of P/2 nodes x 2 ranks at np 4, 2 x 1
// at np 2, 1 x 1 at np 1); shared and hierarchical must also be bitwise equal to alltoallv.
// The same holds for every router (topk, topk_bias with a non-zero bias, expert_choice) and
// with shared experts; expert choice gives every expert exactly c = ceil(N C / E) tokens and
// breaks equal scores by global token index.
#include "model/layers/moe_layer.hpp"
#include "model/routers/topk.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>

using moe::ConstView;
using moe::Tensor;
using moe::View;
using moe::comm::Communicator;
using moe::comm::ExpertPlacement;
using moe::model::Activation;
using moe::model::ExchangeMode;
using moe::model::MoeConfig;
using moe::model::MoeLayer;
using moe::model::RouterKind;

using moe::test::randomize;

namespace {

constexpr double kTol = 1e-5;

struct Case {
  std::string name;
  MoeConfig config;
  int64_t tokens = 53;  // global
  int64_t d = 16;
  // First global token of each rank (size P + 1); empty: even split.
  std::function<std::vector<int64_t>(int64_t, int)> shard;
  // Applied to both layers after construction (same global weights).
  std::function<void(MoeLayer&)> tweak;
  std::function<void(View)> tweak_x;
};

Case make_case(std::string name, const MoeConfig& config) {
  Case c;
  c.name = std::move(name);
  c.config = config;
  return c;
}

std::vector<int64_t> even_shard(int64_t T, int P) {
  std::vector<int64_t> b(P + 1);
  for (int r = 0; r <= P; ++r) b[r] = T * r / P;
  return b;
}

// What a distributed run leaves behind, for the bitwise comparison of the two exchanges.
struct Outcome {
  Tensor y, dx;
  std::vector<Tensor> dw_replicated;  // router and shared experts, this rank's sums
  std::vector<Tensor> dw_experts;     // dW1, dW2 per local expert
};

Tensor clone_of(ConstView v) {
  Tensor t({v.rows, v.cols});
  moe::copy(v, t.view());
  return t;
}

// The router's weight W_r [d, E] (every router's first parameter).
View router_w(MoeLayer& l) {
  return l.router().params()[0].value;
}

// Expert choice's c for N global tokens.
int64_t expert_choice_c(const MoeConfig& c, int64_t N) {
  const double C = c.capacity_factor > 0 ? c.capacity_factor : c.top_k;
  return std::min<int64_t>(N, static_cast<int64_t>(std::ceil(N * C / c.n_experts)));
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.numel() != b.numel()) return false;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (a[i] != b[i]) return false;  // the values are finite: == is bitwise here
  return true;
}

// The forced node layout of the hierarchical runs: 2 ranks per node when P is even and > 2.
int hier_ranks_per_node(int P) {
  return P > 2 && P % 2 == 0 ? 2 : 1;
}

Outcome run_mode(const Case& c, ExchangeMode mode) {
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const int P = world.size(), rank = world.rank();
  const int64_t T = c.tokens, d = c.d;
  const int k = c.config.top_k;
  SCOPED_TRACE(c.name + " np=" + std::to_string(P) + " exchange " +
               moe::model::exchange_mode_name(mode));

  Tensor x({T, d}), dy({T, d});
  randomize(x.view(), 101);
  randomize(dy.view(), 202);
  if (c.tweak_x) c.tweak_x(x.view());

  // The single-rank reference, on every rank.
  ExpertPlacement one = ExpertPlacement::blocked(c.config.n_experts, 1);
  MoeLayer ref("ref", d, c.config, one, self, 1234);
  if (c.tweak) c.tweak(ref);
  Tensor y_ref({T, d}), dx_ref({T, d});
  ref.forward(x.view(), y_ref.view());
  ref.backward(dy.view(), dx_ref.view(), 0.5f);

  // The distributed layer on this rank's shard.
  ExpertPlacement placement = ExpertPlacement::blocked(c.config.n_experts, P);
  MoeConfig cfg = c.config;
  cfg.exchange = mode;
  if (mode == ExchangeMode::kHierarchical) cfg.ranks_per_node = hier_ranks_per_node(P);
  MoeLayer layer("moe", d, cfg, placement, world, 1234);
  EXPECT_EQ(layer.exchange(), mode);
  // Replicated weights as the reference's (shared experts are initialised from the layer name).
  for (size_t i = 0; i < layer.replicated_params().size(); ++i)
    moe::copy(ref.replicated_params()[i].value, layer.replicated_params()[i].value);
  if (c.tweak) c.tweak(layer);
  std::vector<int64_t> b = c.shard ? c.shard(T, P) : even_shard(T, P);
  const int64_t t0 = b[rank], nt = b[rank + 1] - b[rank];
  Tensor y({nt, d}), dx({nt, d});
  ConstView xs = ConstView(x.view()).row_range(t0, nt);
  // Two steps: buffers are reused, gradients accumulate (so compare against 2x the reference).
  for (int step = 0; step < 2; ++step) {
    layer.forward(xs, y.view());
    layer.backward(ConstView(dy.view()).row_range(t0, nt), dx.view(), 0.5f);
  }

  EXPECT_LT(moe::max_rel_error(y.view(), ConstView(y_ref.view()).row_range(t0, nt)), kTol);
  EXPECT_LT(moe::max_rel_error(dx.view(), ConstView(dx_ref.view()).row_range(t0, nt)), kTol);
  EXPECT_NEAR(layer.aux_loss(), ref.aux_loss(), 1e-6 * (1 + ref.aux_loss()));

  // Router and shared experts: replicated weights, gradient summed over the data-parallel ranks.
  Outcome out{y.clone(), dx.clone(), {}, {}};
  std::vector<moe::model::ParamRef> rep = layer.replicated_params(),
                                    rep_ref = ref.replicated_params();
  EXPECT_EQ(rep.size(), rep_ref.size());
  for (size_t i = 0; i < std::min(rep.size(), rep_ref.size()); ++i) {
    out.dw_replicated.push_back(clone_of(rep[i].grad));
    Tensor g = clone_of(rep[i].grad);
    world.allreduce_sum(g.data(), g.numel());
    Tensor g_ref = clone_of(rep_ref[i].grad);
    for (int64_t j = 0; j < g_ref.numel(); ++j) g_ref[j] *= 2;
    EXPECT_LT(moe::max_rel_error(g.view(), g_ref.view(), 1e-3), kTol) << rep[i].name;
  }

  // Experts by global id (the reference holds expert g in slot g).
  const std::vector<int>& ids = layer.experts().global_ids();
  for (int e = 0; e < static_cast<int>(ids.size()); ++e) {
    const int g = ids[e];
    EXPECT_EQ(moe::max_rel_error(layer.experts().w1(e), ref.experts().w1(g)), 0.0);
    Tensor r1({ref.experts().dw1(g).rows, ref.experts().dw1(g).cols});
    Tensor r2({ref.experts().dw2(g).rows, ref.experts().dw2(g).cols});
    moe::copy(ref.experts().dw1(g), r1.view());
    moe::copy(ref.experts().dw2(g), r2.view());
    for (int64_t i = 0; i < r1.numel(); ++i) r1[i] *= 2;
    for (int64_t i = 0; i < r2.numel(); ++i) r2[i] *= 2;
    EXPECT_LT(moe::max_rel_error(layer.experts().dw1(e), r1.view(), 1e-3), kTol) << "expert " << g;
    EXPECT_LT(moe::max_rel_error(layer.experts().dw2(e), r2.view(), 1e-3), kTol) << "expert " << g;
  }

  // Load statistics are global and identical to the reference's.
  const auto &s = layer.stats().load, &sr = ref.stats().load;
  EXPECT_EQ(s.expert_tokens, sr.expert_tokens);
  EXPECT_EQ(s.slots_total, sr.slots_total);
  EXPECT_EQ(s.slots_dropped, sr.slots_dropped);
  if (c.config.capacity_factor == 0.0 || c.config.router == RouterKind::kExpertChoice) {
    EXPECT_EQ(s.slots_dropped, 0);
  }
  if (c.config.router == RouterKind::kExpertChoice) {
    // Every expert takes exactly c tokens of the global batch.
    const int64_t cap = expert_choice_c(c.config, T);
    for (int e = 0; e < c.config.n_experts; ++e) EXPECT_EQ(s.expert_tokens[e], cap) << e;
    EXPECT_EQ(s.slots_total, cap * c.config.n_experts);
    // The same (token, expert) choices as the reference, token by token.
    const auto &r = layer.route(), &rr = ref.route();
    for (int64_t t = 0; t < nt; ++t) {
      std::vector<int> got, want;
      for (int j = 0; j < r.k; ++j)
        if (r.expert[t * r.k + j] >= 0) got.push_back(r.expert[t * r.k + j]);
      for (int j = 0; j < rr.k; ++j)
        if (rr.expert[(t0 + t) * rr.k + j] >= 0) want.push_back(rr.expert[(t0 + t) * rr.k + j]);
      EXPECT_EQ(got, want) << "token " << t0 + t;
    }
  } else {
    EXPECT_EQ(s.slots_total, T * k);
  }
  for (int e = 0; e < static_cast<int>(ids.size()); ++e) {
    for (View g : {layer.experts().dw1(e), layer.experts().dw2(e)}) {
      Tensor t({g.rows, g.cols});
      moe::copy(g, t.view());
      out.dw_experts.push_back(std::move(t));
    }
  }
  return out;
}

void expect_bitwise_equal(const Outcome& a, const Outcome& b) {
  EXPECT_TRUE(bitwise_equal(a.y, b.y)) << "y";
  EXPECT_TRUE(bitwise_equal(a.dx, b.dx)) << "dx";
  ASSERT_EQ(a.dw_replicated.size(), b.dw_replicated.size());
  for (size_t i = 0; i < a.dw_replicated.size(); ++i)
    EXPECT_TRUE(bitwise_equal(a.dw_replicated[i], b.dw_replicated[i])) << "replicated " << i;
  ASSERT_EQ(a.dw_experts.size(), b.dw_experts.size());
  for (size_t i = 0; i < a.dw_experts.size(); ++i)
    EXPECT_TRUE(bitwise_equal(a.dw_experts[i], b.dw_experts[i])) << "expert dW " << i;
}

// Every exchange against the single-rank reference, and against alltoallv bitwise.
void run_case(const Case& c) {
  Outcome mpi = run_mode(c, ExchangeMode::kAlltoallv);
  if (c.config.pipeline_chunks > 1) return;  // shared and hierarchical have no pipelined form
  Outcome shared = run_mode(c, ExchangeMode::kShared);
  {
    SCOPED_TRACE(c.name + ": shared vs alltoallv");
    expect_bitwise_equal(shared, mpi);
  }
  Outcome hier = run_mode(c, ExchangeMode::kHierarchical);
  SCOPED_TRACE(c.name + ": hierarchical vs alltoallv");
  expect_bitwise_equal(hier, mpi);
}

MoeConfig config(Activation act, double capacity, int chunks, int k = 2) {
  MoeConfig c;
  c.n_experts = 8;
  c.top_k = k;
  c.d_ff = 24;
  c.activation = act;
  c.aux_loss_coef = 0.1;
  c.z_loss_coef = 0.05;
  c.capacity_factor = capacity;
  c.pipeline_chunks = chunks;
  return c;
}

// Every token to expert 3: a constant feature that only expert 3's router column sees.
void hot_expert(MoeLayer& l) {
  View w = router_w(l);
  for (int64_t e = 0; e < w.cols; ++e) w(0, e) = e == 3 ? 4.0f : 0.0f;
}
void hot_feature(View x) {
  for (int64_t t = 0; t < x.rows; ++t) x(t, 0) = 3.0f;
}
// Rank 1 (when there is one) holds no tokens; rank 0 takes its share.
std::vector<int64_t> empty_rank_1(int64_t T, int P) {
  std::vector<int64_t> b = even_shard(T, P);
  if (P > 1) b[1] = b[2];
  return b;
}

}  // namespace

class MoeLayerModes
    : public testing::TestWithParam<std::tuple<Activation, double /*capacity*/, int /*chunks*/>> {};

TEST_P(MoeLayerModes, DistributedEqualsSingleRank) {
  auto [act, capacity, chunks] = GetParam();
  Case c = make_case("modes", config(act, capacity, chunks));
  run_case(c);
}

INSTANTIATE_TEST_SUITE_P(All, MoeLayerModes,
                         testing::Combine(testing::Values(Activation::kGelu, Activation::kSwiglu),
                                          testing::Values(0.0, 1.0, 0.5), testing::Values(1, 3)));

TEST(MoeLayer, AllTokensToOneExpert) {
  for (double capacity : {0.0, 1.0})
    for (int chunks : {1, 2}) {
      Case c = make_case("hot", config(Activation::kGelu, capacity, chunks, 1));
      c.config.renormalize = false;
      c.tweak = hot_expert;
      c.tweak_x = hot_feature;
      run_case(c);
    }
}

TEST(MoeLayer, TopTwoWithOneHotExpertAndIdleOthers) {
  Case c = make_case("hot-k2", config(Activation::kSwiglu, 0.0, 2, 2));
  c.tweak = hot_expert;
  c.tweak_x = hot_feature;
  run_case(c);
}

TEST(MoeLayer, RankWithNoTokens) {
  for (double capacity : {0.0, 1.25})
    for (int chunks : {1, 3}) {
      Case c = make_case("empty-rank", config(Activation::kGelu, capacity, chunks));
      c.shard = empty_rank_1;
      run_case(c);
    }
}

MoeConfig with_router(MoeConfig c, RouterKind r, int shared = 0) {
  c.router = r;
  c.shared_experts = shared;
  return c;
}

// topk_bias: a bias that changes the selection (expert 5 favoured, expert 0 avoided).
void biased(MoeLayer& l) {
  auto& r = dynamic_cast<moe::model::TopKRouter&>(l.router());
  for (int e = 0; e < 8; ++e) r.bias()[e] = e == 5 ? 0.3f : (e == 0 ? -0.3f : 0.01f * e);
}

TEST(MoeLayerRouters, TopKBias) {
  for (double capacity : {0.0, 1.0})
    for (int chunks : {1, 3}) {
      Case c = make_case("topk_bias", with_router(config(Activation::kGelu, capacity, chunks),
                                                  RouterKind::kTopKBias));
      c.tweak = biased;
      run_case(c);
    }
}

TEST(MoeLayerRouters, ExpertChoice) {
  for (double capacity : {0.0, 1.5})
    for (int chunks : {1, 3}) {
      Case c = make_case("expert_choice", with_router(config(Activation::kSwiglu, capacity, chunks),
                                                      RouterKind::kExpertChoice));
      run_case(c);
    }
}

TEST(MoeLayerRouters, ExpertChoiceRankWithNoTokensAndTinyBatch) {
  Case c = make_case("ec-empty-rank",
                     with_router(config(Activation::kGelu, 0.0, 1), RouterKind::kExpertChoice));
  c.shard = empty_rank_1;
  run_case(c);
  Case tiny = make_case("ec-tiny",
                        with_router(config(Activation::kGelu, 0.0, 2), RouterKind::kExpertChoice));
  tiny.tokens = 3;  // c = ceil(3 * 2 / 8) = 1
  run_case(tiny);
}

TEST(MoeLayerRouters, SharedExperts) {
  run_case(make_case("shared-topk",
                     with_router(config(Activation::kGelu, 0.0, 1), RouterKind::kTopK, 2)));
  run_case(make_case(
      "shared-ec", with_router(config(Activation::kSwiglu, 0.0, 3), RouterKind::kExpertChoice, 1)));
  Case c = make_case("shared-bias",
                     with_router(config(Activation::kGelu, 1.0, 1), RouterKind::kTopKBias, 1));
  c.tweak = biased;
  run_case(c);
}

TEST(MoeLayerRouters, ExpertChoiceTiesGoToLowerGlobalTokens) {
  // Identical tokens score identically: every expert takes the c lowest global token indices,
  // whatever the rank count, so tokens [0, c) get all E experts and the others none.
  auto same_rows = [](View x) {
    for (int64_t t = 1; t < x.rows; ++t)
      for (int64_t j = 0; j < x.cols; ++j) x(t, j) = x(0, j);
  };
  Case c = make_case("ec-ties",
                     with_router(config(Activation::kGelu, 0.0, 1), RouterKind::kExpertChoice));
  c.tweak_x = same_rows;
  run_case(c);

  Communicator world = Communicator::world();
  const int P = world.size(), rank = world.rank();
  const int64_t T = 53, d = 16;
  MoeLayer layer("ties", d, c.config, ExpertPlacement::blocked(8, P), world, 5);
  Tensor x({T, d}), y({T, d});
  randomize(x.view(), 9);
  same_rows(x.view());
  std::vector<int64_t> b = even_shard(T, P);
  const int64_t t0 = b[rank], nt = b[rank + 1] - b[rank];
  layer.forward(ConstView(x.view()).row_range(t0, nt), y.view().row_range(0, nt));
  const int64_t cap = expert_choice_c(c.config, T);
  EXPECT_EQ(cap, 14);
  const auto& r = layer.route();
  for (int64_t t = 0; t < nt; ++t) {
    int n = 0;
    for (int j = 0; j < r.k; ++j) n += r.expert[t * r.k + j] >= 0;
    EXPECT_EQ(n, t0 + t < cap ? 8 : 0) << "global token " << t0 + t;
  }
}

TEST(MoeLayer, FewerTokensThanChunks) {
  Case c = make_case("tiny", config(Activation::kGelu, 0.0, 4));
  c.tokens = 3;
  run_case(c);
}

TEST(MoeLayer, DroppedSlotsContributeZero) {
  // Capacity mode on one rank: a token whose slots are all kept matches the dropless layer, a
  // token whose slots are all dropped gets y = 0, and the drop rate is reported.
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  MoeConfig cfg = config(Activation::kGelu, 0.6, 1);
  ExpertPlacement one = ExpertPlacement::blocked(cfg.n_experts, 1);
  MoeLayer dropping("a", 16, cfg, one, self, 7);
  cfg.capacity_factor = 0.0;
  MoeLayer dropless("b", 16, cfg, one, self, 7);
  const int64_t T = 40;
  Tensor x({T, 16}), ya({T, 16}), yb({T, 16});
  randomize(x.view(), 3);
  dropping.forward(x.view(), ya.view());
  dropless.forward(x.view(), yb.view());
  const auto& load = dropping.stats().load;
  EXPECT_GT(load.slots_dropped, 0);
  EXPECT_DOUBLE_EQ(load.drop_rate(), double(load.slots_dropped) / load.slots_total);
  const std::vector<uint8_t>& kept = dropping.plan().kept();
  int all_kept = 0, none_kept = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int n = kept[2 * t] + kept[2 * t + 1];
    ConstView a = ConstView(ya.view()).row_range(t, 1), b = ConstView(yb.view()).row_range(t, 1);
    if (n == 2) {
      ++all_kept;
      EXPECT_LT(moe::max_rel_error(a, b), 1e-6) << "token " << t;
    } else if (n == 0) {
      ++none_kept;
      for (int64_t c = 0; c < 16; ++c) EXPECT_EQ(a(0, c), 0.0f) << "token " << t;
    }
  }
  EXPECT_GT(all_kept, 0);
  EXPECT_GT(none_kept, 0);
}

TEST(MoeLayer, DirectionalDerivativesMatchFiniteDifferences) {
  // The layer's own glue (weighted combine, dweight = <dy, slot_out>, per-token sum of dx, the
  // aux-loss scale) against central differences of L = <C, y> + s aux along random directions,
  // on one rank, in fp32. The loss (~1) is summed in double from fp32 outputs (~1e-7 relative
  // each, ~1e-7 absolute in L after cancellation of the common rounding), so with h = 1e-3 the
  // difference quotient carries ~1e-5 absolute noise (observed <= 1.5e-5) and O(h^2) truncation
  // ~1e-6 relative: tolerance 5e-5 + 1e-3 |fd|. Scaling dweight by 0.9 fails it.
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  struct Variant {
    RouterKind router;
    int shared, chunks;
  };
  for (Variant v :
       {Variant{RouterKind::kTopK, 0, 1}, Variant{RouterKind::kTopK, 0, 2},
        Variant{RouterKind::kExpertChoice, 0, 1}, Variant{RouterKind::kExpertChoice, 1, 2},
        Variant{RouterKind::kTopKBias, 1, 1}}) {
    const int chunks = v.chunks;
    SCOPED_TRACE(std::string(moe::model::router_kind_name(v.router)) + " shared " +
                 std::to_string(v.shared));
    MoeConfig cfg = with_router(config(Activation::kSwiglu, 0.0, chunks), v.router, v.shared);
    cfg.aux_loss_coef = 0.5;
    cfg.z_loss_coef = 0.2;
    ExpertPlacement one = ExpertPlacement::blocked(cfg.n_experts, 1);
    MoeLayer layer("fd", 8, cfg, one, self, 11);
    const int64_t T = 20, d = 8;
    const float s = 0.5f;
    Tensor x({T, d}), c({T, d}), y({T, d}), dx({T, d});
    randomize(x.view(), 1);
    randomize(c.view(), 2);
    auto loss = [&]() {
      layer.forward(x.view(), y.view());
      double l = s * layer.aux_loss();
      for (int64_t i = 0; i < T * d; ++i) l += double(c[i]) * y[i];
      return l;
    };
    loss();
    layer.zero_grad();
    layer.backward(c.view(), dx.view(), s);
    const double h = 1e-3;
    auto check = [&](View value, ConstView grad, const std::string& what, uint32_t seed) {
      Tensor v({value.rows, value.cols}), orig({value.rows, value.cols});
      randomize(v.view(), seed);
      moe::copy(value, orig.view());
      double analytic = 0.0;
      for (int64_t i = 0; i < value.rows; ++i)
        for (int64_t j = 0; j < value.cols; ++j)
          analytic += double(grad(i, j)) * v[i * value.cols + j];
      auto shift = [&](double a) {
        for (int64_t i = 0; i < value.rows; ++i)
          for (int64_t j = 0; j < value.cols; ++j)
            value(i, j) = orig[i * value.cols + j] + static_cast<float>(a) * v[i * value.cols + j];
      };
      shift(h);
      const double lp = loss();
      shift(-h);
      const double lm = loss();
      moe::copy(orig.view(), value);
      const double fd = (lp - lm) / (2 * h);
      EXPECT_NEAR(analytic, fd, 5e-5 + 1e-3 * std::abs(fd)) << what << " chunks " << chunks;
    };
    check(x.view(), dx.view(), "x", 3);
    uint32_t seed = 10;
    for (moe::model::ParamRef& p : layer.params()) check(p.value, p.grad, p.name, seed++);
  }
}

TEST(MoeConfig, FromConfigDefaultsAndOverrides) {
  MoeConfig d = MoeConfig::from(moe::Config());
  EXPECT_EQ(d.n_experts, 8);
  EXPECT_EQ(d.top_k, 2);
  EXPECT_EQ(d.d_ff, 2048);
  EXPECT_EQ(d.activation, Activation::kGelu);
  EXPECT_TRUE(d.renormalize);
  EXPECT_EQ(d.capacity_factor, 0.0);
  EXPECT_EQ(d.pipeline_chunks, 1);
  EXPECT_EQ(d.exchange, ExchangeMode::kAuto);
  moe::Config c = moe::Config::parse(
      "model:\n  moe:\n    activation: swiglu\n    capacity_factor: 1.25\n    top_k: 1\n",
      "t.yaml");
  c.set("model.moe.pipeline_chunks=4");
  c.set("comm.exchange=alltoallv");
  MoeConfig o = MoeConfig::from(c);
  EXPECT_EQ(o.exchange, ExchangeMode::kAlltoallv);
  EXPECT_THROW(c.set("comm.exchange=shm"), moe::Error);
  EXPECT_EQ(d.ranks_per_node, 0);
  c.set("comm.exchange=hierarchical");
  c.set("comm.ranks_per_node=2");
  EXPECT_EQ(MoeConfig::from(c).exchange, ExchangeMode::kHierarchical);
  EXPECT_EQ(MoeConfig::from(c).ranks_per_node, 2);
  EXPECT_THROW(c.set("comm.ranks_per_node=-1"), moe::Error);
  EXPECT_EQ(o.activation, Activation::kSwiglu);
  EXPECT_EQ(o.capacity_factor, 1.25);
  EXPECT_EQ(o.top_k, 1);
  EXPECT_EQ(o.pipeline_chunks, 4);
  EXPECT_THROW(moe::Config::parse("model:\n  moe:\n    activation: relu\n", "t.yaml"), moe::Error);
  EXPECT_THROW(moe::Config::parse("model:\n  moe:\n    top_k: 0\n", "t.yaml"), moe::Error);
  moe::Config big;
  big.set("model.moe.top_k=9");
  EXPECT_THROW(MoeConfig::from(big), moe::Error);  // top_k > num_experts
}

TEST(MoeLayer, ExchangeModeResolution) {
  // All test ranks share one node: auto is shared unless pipelined; shared + pipelined is a
  // configuration error naming both keys.
  Communicator world = Communicator::world();
  ExpertPlacement placement = ExpertPlacement::blocked(8, world.size());
  MoeConfig cfg = config(Activation::kGelu, 0.0, 1);
  EXPECT_EQ(MoeLayer("a", 16, cfg, placement, world, 1).exchange(), ExchangeMode::kShared);
  cfg.pipeline_chunks = 2;
  EXPECT_EQ(MoeLayer("b", 16, cfg, placement, world, 1).exchange(), ExchangeMode::kAlltoallv);
  cfg.exchange = ExchangeMode::kShared;
  try {
    MoeLayer("c", 16, cfg, placement, world, 1);
    ADD_FAILURE() << "shared with pipeline_chunks 2 was accepted";
  } catch (const moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("comm.exchange"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.moe.pipeline_chunks"), std::string::npos)
        << e.what();
  }
  cfg.pipeline_chunks = 1;
  cfg.exchange = ExchangeMode::kAlltoallv;
  EXPECT_EQ(MoeLayer("d", 16, cfg, placement, world, 1).exchange(), ExchangeMode::kAlltoallv);
}

TEST(MoeLayer, ExchangeModeResolutionOnForcedNodes) {
  // comm.ranks_per_node splits the ranks of this one machine into "nodes": auto is then
  // hierarchical on several nodes of several ranks, alltoallv on nodes of one rank, never
  // shared; shared is an error; a ranks_per_node that does not divide P is an error.
  Communicator world = Communicator::world();
  const int P = world.size();
  ExpertPlacement placement = ExpertPlacement::blocked(8, P);
  MoeConfig cfg = config(Activation::kGelu, 0.0, 1);
  auto expect_config_error = [&](const MoeConfig& c, const std::string& needle) {
    try {
      MoeLayer("bad", 16, c, placement, world, 1);
      ADD_FAILURE() << "accepted; expected an error containing '" << needle << "'";
    } catch (const moe::Error& e) {
      EXPECT_EQ(e.kind(), moe::ErrorKind::kConfig);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  cfg.ranks_per_node = 1;  // P nodes x 1 rank
  EXPECT_EQ(MoeLayer("a", 16, cfg, placement, world, 1).exchange(),
            P == 1 ? ExchangeMode::kShared : ExchangeMode::kAlltoallv);
  if (P == 4) {
    cfg.ranks_per_node = 2;  // 2 nodes x 2 ranks
    EXPECT_EQ(MoeLayer("b", 16, cfg, placement, world, 1).exchange(), ExchangeMode::kHierarchical);
    cfg.exchange = ExchangeMode::kShared;
    expect_config_error(cfg, "2 nodes x 2 ranks (comm.ranks_per_node)");
    cfg.exchange = ExchangeMode::kHierarchical;
    EXPECT_EQ(MoeLayer("c", 16, cfg, placement, world, 1).exchange(), ExchangeMode::kHierarchical);
  }
  cfg.ranks_per_node = P;  // one node of P ranks: shared stays available
  cfg.exchange = ExchangeMode::kAuto;
  EXPECT_EQ(MoeLayer("d", 16, cfg, placement, world, 1).exchange(), ExchangeMode::kShared);
  cfg.exchange = ExchangeMode::kHierarchical;
  EXPECT_EQ(MoeLayer("e", 16, cfg, placement, world, 1).exchange(), ExchangeMode::kHierarchical);
  cfg.pipeline_chunks = 2;
  expect_config_error(cfg, "comm.exchange = hierarchical has no pipelined form");
  cfg.pipeline_chunks = 1;
  cfg.exchange = ExchangeMode::kAuto;
  cfg.ranks_per_node = P + 1;
  expect_config_error(cfg, "comm.ranks_per_node = " + std::to_string(P + 1) + " does not divide");
  cfg.ranks_per_node = -1;
  expect_config_error(cfg, "comm.ranks_per_node = -1");
}
