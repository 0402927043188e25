// PEER layer: (1) finite-difference gradients of a small layer on one rank (x, query weights,
// batch-norm gain and bias, both sub-key tables, U and V); (2) distributed == single rank: on
// np = 1, 2, 4 the output, dx and every gradient equal a single-rank reference computed in the
// same test (relative error < 1e-5), with and without batch norm, also with a rank that holds no
// tokens; (3) the sparse AdamW update changes only retrieved rows of U and V.
#include "model/layers/peer.hpp"
#include "model/optim.hpp"
#include "tests/test_util.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>

using moe::ConstView;
using moe::Tensor;
using moe::View;
using moe::comm::Communicator;
using moe::model::ParamRef;
using moe::model::PeerConfig;
using moe::model::PeerLayer;
using moe::test::randomize;

namespace {

PeerConfig small_config(bool bn) {
  PeerConfig c;
  c.n_sub_keys = 6;  // N = 36
  c.heads = 2;
  c.top_k = 3;
  c.d_key = 8;
  c.batch_norm = bn;
  return c;
}

// L = sum y * r for a fixed random r.
double loss(PeerLayer& layer, ConstView x, ConstView r) {
  Tensor y({x.rows, x.cols});
  layer.forward(x, y.view());
  double s = 0;
  for (int64_t i = 0; i < x.rows; ++i)
    for (int64_t j = 0; j < x.cols; ++j) s += double(y.view()(i, j)) * r(i, j);
  return s;
}

// Central differences on a few elements of `value`, against `grad`; skips elements whose
// perturbation changes the retrieved experts (the loss is not differentiable there).
void fd_check(const std::string& what, PeerLayer& layer, ConstView x, ConstView r, View value,
              ConstView grad, int samples, double tol) {
  const float h = 2e-3f;
  const std::vector<int32_t> ids0 = layer.expert_ids();
  int checked = 0;
  double worst = 0, scale = 1e-3;
  for (int64_t i = 0; i < grad.rows; ++i)
    for (int64_t j = 0; j < grad.cols; ++j) scale = std::max(scale, std::fabs(double(grad(i, j))));
  for (int s = 0; s < samples; ++s) {
    const int64_t i = (s * 7919) % value.rows, j = (s * 104729 + 3) % value.cols;
    const float keep = value(i, j);
    value(i, j) = keep + h;
    const double lp = loss(layer, x, r);
    const bool same_p = layer.expert_ids() == ids0;
    value(i, j) = keep - h;
    const double lm = loss(layer, x, r);
    const bool same_m = layer.expert_ids() == ids0;
    value(i, j) = keep;
    if (!same_p || !same_m) continue;
    const double fd = (lp - lm) / (2.0 * h);
    worst = std::max(worst, std::fabs(fd - grad(i, j)) / scale);
    ++checked;
  }
  EXPECT_GT(checked, samples / 3) << what << ": too many samples changed the retrieval";
  EXPECT_LT(worst, tol) << what;
}

void finite_differences(bool bn) {
  SCOPED_TRACE(bn ? "batch norm" : "no batch norm");
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const int64_t T = 11, d = 10;
  PeerLayer layer("peer", d, small_config(bn), self, 7);
  randomize(layer.bn_gain(), 5, 0.5f);
  for (int64_t c = 0; c < layer.bn_gain().cols; ++c) layer.bn_gain()(0, c) += 1.0f;
  randomize(layer.bn_bias(), 6, 0.3f);
  Tensor x({T, d}), r({T, d}), y({T, d}), dx({T, d});
  randomize(x.view(), 1);
  randomize(r.view(), 2);
  layer.zero_grad();
  layer.forward(x.view(), y.view());
  layer.backward(r.view(), dx.view());
  auto snapshot = [](ConstView v) {
    Tensor t({v.rows, v.cols});
    moe::copy(v, t.view());
    return t;
  };
  Tensor dwq = snapshot(layer.dwq()), dk1 = snapshot(layer.dkeys1()),
         dk2 = snapshot(layer.dkeys2()), du = snapshot(layer.du()), dv = snapshot(layer.dv()),
         dg = snapshot(layer.dbn_gain()), db = snapshot(layer.dbn_bias());
  // float32 forward, h = 2e-3; relative to the largest gradient (seen: < 5e-4).
  const double tol = 2e-3;
  fd_check("x", layer, x.view(), r.view(), x.view(), dx.view(), 40, tol);
  fd_check("wq", layer, x.view(), r.view(), layer.wq(), dwq.view(), 40, tol);
  fd_check("keys1", layer, x.view(), r.view(), layer.keys1(), dk1.view(), 30, tol);
  fd_check("keys2", layer, x.view(), r.view(), layer.keys2(), dk2.view(), 30, tol);
  if (bn) {
    fd_check("bn gain", layer, x.view(), r.view(), layer.bn_gain(), dg.view(), 16, tol);
    fd_check("bn bias", layer, x.view(), r.view(), layer.bn_bias(), db.view(), 16, tol);
  }
  // U and V: check elements of retrieved rows (the others have zero gradient and no effect).
  std::set<int64_t> rows(layer.touched_rows().begin(), layer.touched_rows().end());
  ASSERT_FALSE(rows.empty());
  int n = 0;
  for (int64_t row : rows) {
    if (++n > 8) break;
    fd_check("u row " + std::to_string(row), layer, x.view(), r.view(), layer.u().row_range(row, 1),
             ConstView(du.view()).row_range(row, 1), 4, tol);
    fd_check("v row " + std::to_string(row), layer, x.view(), r.view(), layer.v().row_range(row, 1),
             ConstView(dv.view()).row_range(row, 1), 4, tol);
  }
  // Untouched rows have exactly zero gradient.
  for (int64_t row = 0; row < layer.n_rows_local(); ++row)
    if (!rows.count(row)) {
      for (int64_t j = 0; j < d; ++j) ASSERT_EQ(du.view()(row, j), 0.0f) << "row " << row;
    }
}

TEST(Peer, FiniteDifferences) {
  finite_differences(true);
  finite_differences(false);
}

Tensor summed(const Communicator& comm, ConstView g) {
  Tensor t({g.rows, g.cols});
  moe::copy(g, t.view());
  comm.allreduce_sum(t.data(), t.numel());
  return t;
}

Tensor scaled(ConstView g, float s) {
  Tensor t({g.rows, g.cols});
  moe::copy(g, t.view());
  for (int64_t i = 0; i < t.numel(); ++i) t[i] *= s;
  return t;
}

void equivalence(bool bn, bool empty_rank) {
  Communicator world = Communicator::world();
  Communicator self = world.split(world.rank(), 0);
  const int P = world.size(), rank = world.rank();
  SCOPED_TRACE(std::string(bn ? "bn" : "no bn") + (empty_rank ? " empty rank 1" : "") +
               " np=" + std::to_string(P));
  const int64_t T = 41, d = 12;
  PeerConfig cfg = small_config(bn);
  cfg.n_sub_keys = 8;  // N = 64, blocks of 8 over up to 4 ranks
  Tensor x({T, d}), dy({T, d});
  randomize(x.view(), 11);
  randomize(dy.view(), 12);
  PeerLayer ref("peer", d, cfg, self, 99);
  Tensor y_ref({T, d}), dx_ref({T, d});
  ref.zero_grad();
  ref.forward(x.view(), y_ref.view());
  ref.backward(dy.view(), dx_ref.view());

  PeerLayer layer("peer", d, cfg, world, 99);
  std::vector<int64_t> b(static_cast<size_t>(P + 1));
  for (int r = 0; r <= P; ++r) b[static_cast<size_t>(r)] = T * r / P;
  if (empty_rank && P > 1) b[1] = b[2];
  const int64_t t0 = b[static_cast<size_t>(rank)], nt = b[static_cast<size_t>(rank + 1)] - t0;
  Tensor y({std::max<int64_t>(nt, 1), d}), dx({std::max<int64_t>(nt, 1), d});
  View yv(y.data(), nt, d), dxv(dx.data(), nt, d);
  layer.zero_grad();
  // Two steps: buffers are reused, gradients accumulate (so compare against 2x the reference).
  for (int step = 0; step < 2; ++step) {
    layer.forward(ConstView(x.view()).row_range(t0, nt), yv);
    layer.backward(ConstView(dy.view()).row_range(t0, nt), dxv);
  }
  const double tol = 1e-5;
  EXPECT_LT(moe::max_rel_error(yv, ConstView(y_ref.view()).row_range(t0, nt)), tol) << "y";
  EXPECT_LT(moe::max_rel_error(dxv, ConstView(dx_ref.view()).row_range(t0, nt)), tol) << "dx";
  // Replicated parameters: gradients summed over ranks.
  EXPECT_LT(moe::max_rel_error(summed(world, layer.dwq()).view(), scaled(ref.dwq(), 2).view()),
            tol);
  EXPECT_LT(
      moe::max_rel_error(summed(world, layer.dkeys1()).view(), scaled(ref.dkeys1(), 2).view()),
      tol);
  EXPECT_LT(
      moe::max_rel_error(summed(world, layer.dkeys2()).view(), scaled(ref.dkeys2(), 2).view()),
      tol);
  if (bn) {
    EXPECT_LT(moe::max_rel_error(summed(world, layer.dbn_gain()).view(),
                                 scaled(ref.dbn_gain(), 2).view()),
              tol);
    EXPECT_LT(moe::max_rel_error(summed(world, layer.dbn_bias()).view(),
                                 scaled(ref.dbn_bias(), 2).view()),
              tol);
  }
  // Tables: this rank's rows are the reference's rows [row_begin, row_begin + N_l).
  const int64_t r0 = layer.row_begin(), nl = layer.n_rows_local();
  EXPECT_EQ(moe::max_rel_error(layer.u(), ConstView(ref.u()).row_range(r0, nl)), 0.0);
  EXPECT_EQ(moe::max_rel_error(layer.v(), ConstView(ref.v()).row_range(r0, nl)), 0.0);
  EXPECT_LT(
      moe::max_rel_error(layer.du(), scaled(ConstView(ref.du()).row_range(r0, nl), 2).view(), 1e-3),
      tol);
  EXPECT_LT(
      moe::max_rel_error(layer.dv(), scaled(ConstView(ref.dv()).row_range(r0, nl), 2).view(), 1e-3),
      tol);
  // The same rows were touched.
  std::set<int64_t> mine, theirs;
  for (int64_t r : layer.touched_rows()) mine.insert(r + r0);
  for (int64_t r : ref.touched_rows())
    if (r >= r0 && r < r0 + nl) theirs.insert(r);
  EXPECT_EQ(mine, theirs);
  // Usage statistics are global: the distributed layer saw the batch twice.
  moe::model::PeerUsage u = layer.usage(true), ur = ref.usage(true);
  EXPECT_EQ(u.retrievals, 2 * ur.retrievals);
  EXPECT_NEAR(u.usage, ur.usage, 1e-12);
  EXPECT_NEAR(u.kl_uniform, ur.kl_uniform, 1e-9);
}

TEST(Peer, DistributedEqualsSingleRank) {
  equivalence(true, false);
  equivalence(false, false);
  equivalence(true, true);
}

TEST(Peer, SparseAdamWTouchesOnlyRetrievedRows) {
  Communicator world = Communicator::world();
  const int64_t d = 12, T = 5;
  PeerConfig cfg = small_config(true);
  cfg.n_sub_keys = 16;  // N = 256: most rows stay untouched by 5 tokens
  PeerLayer layer("peer", d, cfg, world, 3);
  moe::model::AdamW opt;
  for (const ParamRef& p : layer.table_params()) opt.add(p, true);
  Tensor x({T, d}), y({T, d}), dx({T, d});
  for (int step = 0; step < 2; ++step) {
    Tensor u0({layer.u().rows, d});
    moe::copy(layer.u(), u0.view());
    Tensor v0({layer.v().rows, d});
    moe::copy(layer.v(), v0.view());
    randomize(x.view(), 100 + world.rank() * 10 + step);
    layer.zero_grad();
    layer.forward(x.view(), y.view());
    layer.backward(y.view(), dx.view());
    std::set<int64_t> touched(layer.touched_rows().begin(), layer.touched_rows().end());
    opt.step(1e-2);
    int64_t changed = 0;
    for (int64_t r = 0; r < layer.n_rows_local(); ++r) {
      bool same = true;
      for (int64_t j = 0; j < d; ++j)
        same = same && layer.u()(r, j) == u0.view()(r, j) && layer.v()(r, j) == v0.view()(r, j);
      if (touched.count(r)) {
        EXPECT_FALSE(same) << "touched row " << r << " did not move";
        ++changed;
      } else {
        EXPECT_TRUE(same) << "untouched row " << r << " moved at step " << step;
      }
    }
    EXPECT_LT(static_cast<int64_t>(touched.size()), layer.n_rows_local());
    EXPECT_EQ(changed, static_cast<int64_t>(touched.size()));
  }
}

}  // namespace
