#include "comm/allreduce.hpp"

#include <algorithm>
#include <cmath>

namespace moe::comm {

namespace {

// Calls f(ptr, len, pos) for each contiguous run of the flat elements [begin, begin + n) of v,
// pos counting from 0 at `begin`. Flat element k is v(k / cols, k % cols).
template <typename V, typename F>
void for_runs(V v, int64_t begin, int64_t n, F&& f) {
  if (v.contiguous()) {
    f(v.data + begin, n, int64_t{0});
    return;
  }
  int64_t pos = 0;
  while (pos < n) {
    int64_t k = begin + pos;
    int64_t i = k / v.cols, j = k % v.cols;
    int64_t len = std::min(v.cols - j, n - pos);
    f(v.data + i * v.ld + j, len, pos);
    pos += len;
  }
}

}  // namespace

GradientAllReducer::GradientAllReducer(const Communicator& comm, std::vector<View> grads,
                                       AllReduceOptions options)
    : comm_(comm.split(0, comm.rank())), grads_(std::move(grads)), options_(options) {
  factor_ = options_.average ? options_.scale / static_cast<float>(comm_.size()) : options_.scale;
  bucket_elems_ =
      std::clamp<int64_t>(options_.bucket_bytes / int64_t{sizeof(float)}, 1, kMaxMpiCount);
  for (const View& g : grads_) numel_ += g.size();
  ready_.assign(grads_.size(), 0);
  tensor_buckets_.assign(grads_.size(), {});

  // Cut the flat array [0, N) into buckets and each bucket into segments of tensors.
  const int64_t n_buckets = (numel_ + bucket_elems_ - 1) / bucket_elems_;
  buckets_.resize(static_cast<size_t>(n_buckets));
  int64_t tensor_start = 0;
  for (size_t t = 0; t < grads_.size(); ++t) {
    const int64_t n = grads_[t].size();
    int64_t pos = 0;
    while (pos < n) {
      const int64_t flat = tensor_start + pos;
      const size_t b = static_cast<size_t>(flat / bucket_elems_);
      const int64_t offset = flat - static_cast<int64_t>(b) * bucket_elems_;
      const int64_t len = std::min(bucket_elems_ - offset, n - pos);
      buckets_[b].segments.push_back({t, pos, len, offset});
      buckets_[b].n = offset + len;
      tensor_buckets_[t].push_back(b);
      pos += len;
    }
    tensor_start += n;
  }

  // In place when the bucket is one run of one contiguous tensor, else staged.
  int64_t staged = 0;
  for (Bucket& bk : buckets_) {
    const Segment& s = bk.segments.front();
    bk.in_place = bk.segments.size() == 1 && grads_[s.tensor].contiguous();
    if (!bk.in_place) staged += bk.n;
  }
  staging_.resize(static_cast<size_t>(staged));
  staged = 0;
  for (Bucket& bk : buckets_) {
    if (bk.in_place) {
      const Segment& s = bk.segments.front();
      bk.data = grads_[s.tensor].data + s.begin;
    } else {
      bk.data = staging_.data() + staged;
      staged += bk.n;
    }
  }
  begin();
}

GradientAllReducer::~GradientAllReducer() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  for (Bucket& bk : buckets_)
    if (bk.request != MPI_REQUEST_NULL) MPI_Wait(&bk.request, MPI_STATUS_IGNORE);
}

void GradientAllReducer::begin() {
  for (Bucket& bk : buckets_) {
    MOE_CHECK(bk.request == MPI_REQUEST_NULL, "begin() while a bucket is in flight");
    bk.pending = static_cast<int>(bk.segments.size());
  }
  std::fill(ready_.begin(), ready_.end(), 0);
  next_launch_ = 0;
  next_progress_ = 0;
}

void GradientAllReducer::mark_ready(size_t i) {
  MOE_CHECK(i < grads_.size(), "gradient ", i, " of ", grads_.size());
  MOE_CHECK(!ready_[i], "gradient ", i, " marked ready twice in one step");
  ready_[i] = 1;
  for (size_t b : tensor_buckets_[i]) --buckets_[b].pending;
  launch_ready();
  // Let MPI move the oldest request in flight forward (many MPI libraries progress
  // non-blocking collectives only inside MPI calls).
  while (next_progress_ < next_launch_) {
    int done = 0;
    MOE_MPI_CHECK(MPI_Test(&buckets_[next_progress_].request, &done, MPI_STATUS_IGNORE),
                  "gradient all-reduce: test");
    if (!done) break;
    ++next_progress_;
  }
}

void GradientAllReducer::launch_ready() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0)
    launch(next_launch_++);
}

void GradientAllReducer::launch(size_t b) {
  Bucket& bk = buckets_[b];
  if (!bk.in_place) {
    for (const Segment& s : bk.segments)
      for_runs(grads_[s.tensor], s.begin, s.n, [&](const float* p, int64_t len, int64_t pos) {
        std::copy(p, p + len, bk.data + s.offset + pos);
      });
  }
  MOE_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, bk.data, static_cast<int>(bk.n), MPI_FLOAT, MPI_SUM,
                               comm_.raw(), &bk.request),
                "gradient all-reduce: Iallreduce");
}

void GradientAllReducer::finish() {
  while (next_launch_ < buckets_.size()) launch(next_launch_++);
  for (Bucket& bk : buckets_) {
    MOE_MPI_CHECK(MPI_Wait(&bk.request, MPI_STATUS_IGNORE), "gradient all-reduce: wait");
    const float f = factor_;
    if (bk.in_place) {
      if (f != 1.0f)
        for (int64_t k = 0; k < bk.n; ++k) bk.data[k] *= f;
      continue;
    }
    for (const Segment& s : bk.segments)
      for_runs(grads_[s.tensor], s.begin, s.n, [&](float* p, int64_t len, int64_t pos) {
        const float* src = bk.data + s.offset + pos;
        if (f == 1.0f)
          std::copy(src, src + len, p);
        else
          for (int64_t k = 0; k < len; ++k) p[k] = src[k] * f;
      });
  }
  next_progress_ = next_launch_;
}

void GradientAllReducer::all_reduce() {
  begin();
  finish();
}

double sum_squares(ConstView v) {
  double total = 0;
  for (int64_t i = 0; i < v.rows; ++i) {
    const float* r = v.row(i);
    double acc = 0;
    for (int64_t j = 0; j < v.cols; ++j) acc += static_cast<double>(r[j]) * r[j];
    total += acc;
  }
  return total;
}

double sum_squares_rows(ConstView v, const std::vector<int64_t>& rows) {
  std::vector<int64_t> sorted(rows);
  std::sort(sorted.begin(), sorted.end());
  double total = 0;
  for (int64_t i : sorted) {
    const float* r = v.row(i);
    double acc = 0;
    for (int64_t j = 0; j < v.cols; ++j) acc += static_cast<double>(r[j]) * r[j];
    total += acc;
  }
  return total;
}

double global_grad_norm(const std::vector<ConstView>& dense, const std::vector<ConstView>& expert,
                        const Communicator& comm,
                        const std::vector<const std::vector<int64_t>*>& expert_rows) {
  double sq = 0;
  // Replicated gradients are equal on every rank after the all-reduce: count rank 0's copy.
  if (comm.rank() == 0)
    for (const ConstView& g : dense) sq += sum_squares(g);
  for (size_t i = 0; i < expert.size(); ++i) {
    const std::vector<int64_t>* rows = i < expert_rows.size() ? expert_rows[i] : nullptr;
    sq += rows ? sum_squares_rows(expert[i], *rows) : sum_squares(expert[i]);
  }
  sq = comm.sum(sq, "global grad norm");
  return std::sqrt(sq);
}

}  // namespace moe::comm
