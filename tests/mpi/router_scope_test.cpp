// The rank scope of the load-balancing loss: on P ranks it is the mean of the losses each rank
// would compute alone on its own tokens, and so are its gradients (scaled by 1/P); the global
// scope differs from that mean whenever the ranks route differently.
#include <gtest/gtest.h>

#include <random>

#include "comm/communicator.hpp"
#include "model/routers/topk.hpp"
#include "tests/test_util.hpp"

using moe::Tensor;
using moe::View;
using moe::comm::Communicator;
using moe::model::RouteResult;
using moe::model::TopKOptions;
using moe::model::TopKRouter;

using moe::test::randomize;

namespace {

struct Routed {
  double lb = 0;
  Tensor dx, dw;
};

Routed route(const TopKOptions& o, const Communicator& comm, const Tensor& x) {
  TopKRouter router(x.dim(1), o, &comm, 17);
  RouteResult r;
  router.forward(x.view(), r);
  Tensor dweight({x.dim(0), o.k});  // no combine gradient: only the auxiliary losses
  Routed out;
  out.lb = r.load_balance_loss;
  out.dx = Tensor({x.dim(0), x.dim(1)});
  router.backward(dweight.view(), 1.0f, out.dx.view());
  View dw = router.params()[0].grad;
  out.dw = Tensor({dw.rows, dw.cols});
  moe::copy(dw, out.dw.view());
  return out;
}

}  // namespace

TEST(RouterScope, RankScopeIsTheMeanOfTheRanksOwnLosses) {
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const int P = world.size();
  TopKOptions o;
  o.n_experts = 6;
  o.k = 2;
  o.aux_loss_coef = 0.5;
  o.z_loss_coef = 0.0;
  o.global_balance = false;
  // Ranks hold different numbers of tokens drawn differently, so their routing differs.
  Tensor x({5 + 3 * world.rank(), 8});
  randomize(x.view(), 100 + static_cast<uint32_t>(world.rank()));
  Routed together = route(o, world, x);
  Routed alone = route(o, self, x);
  EXPECT_NEAR(together.lb, world.sum(alone.lb) / P, 1e-9);
  // Gradients: this rank's share of the mean is 1/P of what it computes alone.
  for (int64_t i = 0; i < x.numel(); ++i)
    EXPECT_NEAR(together.dx[i], alone.dx[i] / P, 1e-6 + 1e-5 * std::abs(alone.dx[i]));
  for (int64_t i = 0; i < together.dw.numel(); ++i)
    EXPECT_NEAR(together.dw[i], alone.dw[i] / P, 1e-6 + 1e-5 * std::abs(alone.dw[i]));
  if (P > 1) {
    o.global_balance = true;
    Routed global = route(o, world, x);
    EXPECT_GT(std::abs(global.lb - together.lb), 1e-6) << "the scopes should differ here";
  }
}
