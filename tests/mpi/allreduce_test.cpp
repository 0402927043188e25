// Bucketed, overlapped gradient all-reduce against one plain MPI_Allreduce per tensor, and the
// global gradient norm against a gathered reference; under mpirun -np 2 and 4.
// Tolerances: the all-reduce must match bitwise or within 1e-6 relative (MPI may add in another
// order for another message size when P > 2); the norm within 1e-12 relative (double sums).
#include "comm/allreduce.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model/params.hpp"

using moe::Tensor;
using moe::View;
using moe::comm::AllReduceOptions;
using moe::comm::Communicator;
using moe::comm::GradientAllReducer;

namespace {

// Gradients of odd shapes, one strided (a column window of a wider buffer); values depend on the
// rank and the step.
struct Grads {
  std::vector<Tensor> owned;
  std::vector<View> views;
  Grads(int rank, int step) {
    const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1},   {3, 7}, {13, 5}, {0, 4},
                                                             {257, 3}, {1, 1}, {17, 1}, {5, 11}};
    for (size_t t = 0; t < shapes.size(); ++t) {
      auto [r, c] = shapes[t];
      const bool strided = t == 2 || t == 7;
      owned.emplace_back(Tensor({std::max<int64_t>(r, 1), c + (strided ? 3 : 0)}));
      View full = owned.back().view();
      moe::model::init_uniform(full, 1.0f, 11 + step, moe::model::init_stream("g", rank * 100 + t));
      views.push_back(View(full.data, r, c, full.ld));
    }
  }
};

// The reference: one MPI_Allreduce per tensor (packed when strided), then the same scale.
void reference(Grads& g, float factor, MPI_Comm comm) {
  for (View v : g.views) {
    std::vector<float> buf;
    for (int64_t i = 0; i < v.rows; ++i) buf.insert(buf.end(), v.row(i), v.row(i) + v.cols);
    MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(buf.size()), MPI_FLOAT, MPI_SUM, comm);
    for (int64_t i = 0; i < v.rows; ++i)
      for (int64_t j = 0; j < v.cols; ++j) v(i, j) = buf[i * v.cols + j] * factor;
  }
}

// Maximum relative error over all tensors; also checks padding columns were left alone.
double compare(const Grads& a, const Grads& b) {
  double worst = 0;
  for (size_t t = 0; t < a.views.size(); ++t) {
    if (a.views[t].size() > 0) worst = std::max(worst, moe::max_rel_error(a.views[t], b.views[t]));
    const Tensor &x = a.owned[t], &y = b.owned[t];
    for (int64_t k = 0; k < x.numel(); ++k)
      if (k % x.dim(1) >= a.views[t].cols && x[k] != y[k]) return 1e30;
  }
  return worst;
}

}  // namespace

TEST(GradientAllReducer, BucketsOfEverySizeMatchPerTensorAllreduce) {
  Communicator w = Communicator::world();
  // 4 bytes: one element per bucket; 40: boundaries split tensors; huge: one bucket.
  for (int64_t bucket_bytes : {int64_t{4}, int64_t{40}, int64_t{1000}, int64_t{1} << 30}) {
    Grads ref(w.rank(), 0), got(w.rank(), 0);
    reference(ref, 1.0f / w.size(), w.raw());
    GradientAllReducer reducer(w, got.views, {.bucket_bytes = bucket_bytes});
    reducer.begin();
    for (size_t i = 0; i < got.views.size(); ++i) reducer.mark_ready(i);
    // Everything was ready: every bucket was launched during "backward", before finish().
    EXPECT_EQ(reducer.n_launched(), reducer.n_buckets());
    reducer.finish();
    EXPECT_LE(compare(got, ref), 1e-6) << "bucket_bytes " << bucket_bytes;
    if (w.size() <= 2) {
      EXPECT_EQ(compare(got, ref), 0.0) << "bucket_bytes " << bucket_bytes;
    }
  }
}

TEST(GradientAllReducer, BucketBoundariesSplitTensors) {
  Communicator w = Communicator::world();
  Grads g(w.rank(), 0);
  GradientAllReducer reducer(w, g.views, {.bucket_bytes = 40});  // 10 elements
  EXPECT_EQ(reducer.bucket_elems(), 10);
  // 1 + 21 + 65 + 0 + 771 + 1 + 17 + 55 = 931 elements.
  EXPECT_EQ(reducer.numel(), 931);
  EXPECT_EQ(reducer.n_buckets(), 94u);
  // After the first two tensors (22 elements) only buckets 0 and 1 are complete; bucket 2 waits
  // for tensor 2, which straddles it.
  reducer.begin();
  reducer.mark_ready(0);
  EXPECT_EQ(reducer.n_launched(), 0u);
  reducer.mark_ready(1);
  EXPECT_EQ(reducer.n_launched(), 2u);
  reducer.finish();
}

TEST(GradientAllReducer, OutOfOrderMarksSumWithScaleAndReuseAcrossSteps) {
  Communicator w = Communicator::world();
  Grads g0(w.rank(), 0);
  std::vector<View> views = g0.views;
  GradientAllReducer reducer(w, views, {.bucket_bytes = 100, .average = false, .scale = 0.5f});
  for (int step = 0; step < 3; ++step) {
    Grads fresh(w.rank(), step), ref(w.rank(), step);
    for (size_t t = 0; t < views.size(); ++t) moe::copy(fresh.owned[t].view(), g0.owned[t].view());
    reference(ref, 0.5f, w.raw());
    reducer.begin();
    // Reverse order: launches happen only when the lowest pending bucket completes.
    for (size_t i = views.size(); i-- > 0;) {
      reducer.mark_ready(i);
      if (i > 0) {
        EXPECT_EQ(reducer.n_launched(), 0u);
      }
    }
    reducer.finish();
    EXPECT_LE(compare(g0, ref), 1e-6) << "step " << step;
  }
}

TEST(GradientAllReducer, BlockingPathAndEmptyList) {
  Communicator w = Communicator::world();
  Grads ref(w.rank(), 1), got(w.rank(), 1);
  reference(ref, 1.0f / w.size(), w.raw());
  GradientAllReducer reducer(w, got.views, {.bucket_bytes = 64});
  reducer.all_reduce();
  EXPECT_LE(compare(got, ref), 1e-6);
  GradientAllReducer none(w, {});
  EXPECT_EQ(none.n_buckets(), 0u);
  none.all_reduce();
}

TEST(GlobalGradNorm, MatchesGatheredReference) {
  Communicator w = Communicator::world();
  const int p = w.size(), r = w.rank();
  // Dense: replicated (the same on every rank). Experts: r + 1 tensors of odd sizes per rank.
  Grads dense(0, 3);
  std::vector<Tensor> experts;
  std::vector<moe::ConstView> dense_views(dense.views.begin(), dense.views.end()), expert_views;
  for (int e = 0; e <= r; ++e) {
    experts.emplace_back(Tensor({3 + e, 5}));
    moe::model::init_uniform(experts.back().view(), 2.0f, 5,
                             moe::model::init_stream("e", r * 10 + e));
    expert_views.push_back(experts.back().view());
  }
  const double norm = moe::comm::global_grad_norm(dense_views, expert_views, w);

  // Reference: gather every expert element on rank 0, add the dense squares once.
  std::vector<float> mine;
  for (const Tensor& t : experts) mine.insert(mine.end(), t.data(), t.data() + t.numel());
  int n = static_cast<int>(mine.size());
  std::vector<int> counts(p), displs(p);
  MPI_Gather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, w.raw());
  int total = 0;
  for (int q = 0; q < p; ++q) displs[q] = total, total += counts[q];
  std::vector<float> all(static_cast<size_t>(r == 0 ? total : 0));
  MPI_Gatherv(mine.data(), n, MPI_FLOAT, all.data(), counts.data(), displs.data(), MPI_FLOAT, 0,
              w.raw());
  double ref = 0;
  if (r == 0) {
    for (float x : all) ref += static_cast<double>(x) * x;
    for (const View& v : dense.views)
      for (int64_t i = 0; i < v.rows; ++i)
        for (int64_t j = 0; j < v.cols; ++j) ref += static_cast<double>(v(i, j)) * v(i, j);
    ref = std::sqrt(ref);
  }
  MPI_Bcast(&ref, 1, MPI_DOUBLE, 0, w.raw());
  EXPECT_NEAR(norm, ref, 1e-12 * ref);
  // Every rank holds the same value.
  EXPECT_EQ(w.max(norm), norm);
}
