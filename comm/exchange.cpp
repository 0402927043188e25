#include "comm/exchange.hpp"

#include <cstring>
#include <utility>

#include "runtime/error.hpp"

namespace moe::comm {

namespace {

// Row copies below this many floats run on one thread: the OpenMP fork costs more than it saves.
constexpr int64_t kParallelCopyFloats = int64_t{1} << 18;

double wall_s() {
  return MPI_Wtime();
}

inline void copy_row(const float* src, float* dst, int64_t d) {
  std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(float));
}

// rows [0, n) of src -> rows [0, n) of dst, as one block copy when both are contiguous.
void copy_rows(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t n, int64_t d) {
  if (n <= 0) return;
  if (src_ld == d && dst_ld == d) {
    std::memcpy(dst, src, static_cast<size_t>(n * d) * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) copy_row(src + i * src_ld, dst + i * dst_ld, d);
}

// Grows t to hold at least n floats. Tensor::resize zero-fills on every call, which would cost a
// full pass over the buffer per exchange, so it is only called when the buffer must grow.
void ensure(Tensor& t, int64_t n) {
  if (t.numel() < n) t.resize({n});
}

}  // namespace

Exchange::Exchange(const Communicator& comm, std::string name)
    : comm_(comm), name_(std::move(name)) {}

Exchange::Exchange(Exchange&& o) noexcept
    : comm_(o.comm_),
      name_(std::move(o.name_)),
      stats_(o.stats_),
      dispatch_(std::move(o.dispatch_)),
      combine_(std::move(o.combine_)),
      row_type_(std::exchange(o.row_type_, MPI_DATATYPE_NULL)),
      row_type_d_(std::exchange(o.row_type_d_, 0)) {
  o.dispatch_.request = o.combine_.request = MPI_REQUEST_NULL;
}

Exchange::~Exchange() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  // A movement still in flight at destruction is a caller bug; complete it so MPI stays sane.
  if (dispatch_.request != MPI_REQUEST_NULL) MPI_Wait(&dispatch_.request, MPI_STATUS_IGNORE);
  if (combine_.request != MPI_REQUEST_NULL) MPI_Wait(&combine_.request, MPI_STATUS_IGNORE);
  if (row_type_ != MPI_DATATYPE_NULL) MPI_Type_free(&row_type_);
}

MPI_Datatype Exchange::row_type(int64_t d) {
  if (row_type_ != MPI_DATATYPE_NULL && row_type_d_ == d) return row_type_;
  if (d < 1 || d > kMaxMpiCount)
    throw Error(ErrorKind::kComm, cat(name_, " exchange: row width ", d, " is not a valid count"));
  if (row_type_ != MPI_DATATYPE_NULL)
    MOE_MPI_CHECK(MPI_Type_free(&row_type_), cat(name_, " exchange: free row type"));
  MOE_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(d), MPI_FLOAT, &row_type_),
                cat(name_, " exchange: row type"));
  MOE_MPI_CHECK(MPI_Type_commit(&row_type_), cat(name_, " exchange: row type"));
  row_type_d_ = d;
  return row_type_;
}

void Exchange::set_counts(Movement& m, const std::vector<int64_t>& send_counts,
                          const std::vector<int64_t>& send_displs,
                          const std::vector<int64_t>& recv_counts,
                          const std::vector<int64_t>& recv_displs, const char* what) {
  const int P = comm_.size(), me = comm_.rank();
  auto conv = [&](const std::vector<int64_t>& in, std::vector<int>& out) {
    out.resize(static_cast<size_t>(P));
    for (int q = 0; q < P; ++q) {
      if (in[q] > kMaxMpiCount)
        throw Error(ErrorKind::kComm,
                    cat(name_, " exchange (", what, "): ", in[q], " rows for rank ", q,
                        " exceed the MPI count limit ", kMaxMpiCount,
                        "; use more ranks or "
                        "fewer tokens per step"));
      out[q] = static_cast<int>(in[q]);
    }
  };
  conv(send_counts, m.sc);
  conv(send_displs, m.sd);
  conv(recv_counts, m.rc);
  conv(recv_displs, m.rd);
  m.sc[me] = 0;  // rows for this rank itself are copied, not sent
  m.rc[me] = 0;
  int64_t rows = 0;
  for (int q = 0; q < P; ++q) rows += m.sc[q];
  m.pending_bytes = rows * m.d * int64_t(sizeof(float));
}

// dispatch direction: src rows (per token, or per slot) -> packed by destination rank.
void Exchange::forward_start(Movement& m, const DispatchPlan& plan, ConstView src, bool by_slot,
                             bool direct_self, View out) {
  const char* what = by_slot ? "dispatch_slots" : "dispatch";
  MOE_CHECK(m.plan == nullptr, name_, " exchange: a ", what, " is already in flight");
  const int me = comm_.rank();
  const int k = plan.k();
  const int64_t d = src.cols;
  MOE_CHECK_SHAPE(src, by_slot ? plan.n_tokens() * k : plan.n_tokens(), d,
                  cat(name_, " exchange ", what, " input"));
  if (direct_self) MOE_CHECK_SHAPE(out, plan.n_recv(), d, cat(name_, " exchange ", what, " out"));
  const MPI_Datatype type = row_type(d);
  m.d = d;
  ensure(m.send, plan.n_send() * d);
  ensure(m.recv, plan.n_recv() * d);

  const std::vector<int64_t>& slot = plan.send_slot();
  const int64_t self_begin = plan.send_displs()[me];
  const int64_t self_end = self_begin + plan.send_counts()[me];
  const int64_t n_send = plan.n_send();
  float* send = m.send.data();
  const int kk = by_slot ? 1 : k;  // src row of send row i: slot[i] / kk
#pragma omp parallel for schedule(static) if (n_send * d > kParallelCopyFloats)
  for (int64_t i = 0; i < n_send; ++i) {
    if (i >= self_begin && i < self_end) continue;
    copy_row(src.row(slot[i] / kk), send + i * d, d);
  }
  // This rank's own rows: straight to their grouped place, or to the raw receive buffer.
  const int64_t self_raw = plan.recv_displs()[me];
  for (const RowBlock& b : plan.recv_blocks()) {
    if (b.source != me) continue;
    const int64_t i0 = self_begin + (b.raw - self_raw);
    float* dst = direct_self ? out.row(b.grouped) : m.recv.data() + b.raw * d;
    const int64_t ld = direct_self ? out.ld : d;
    for (int64_t i = 0; i < b.rows; ++i) copy_row(src.row(slot[i0 + i] / kk), dst + i * ld, d);
  }

  set_counts(m, plan.send_counts(), plan.send_displs(), plan.recv_counts(), plan.recv_displs(),
             what);
  m.plan = &plan;
  const std::string op = cat(name_, " exchange ", what);
  if (direct_self) {
    MOE_MPI_CHECK(MPI_Alltoallv(m.send.data(), m.sc.data(), m.sd.data(), type, m.recv.data(),
                                m.rc.data(), m.rd.data(), type, comm_.raw()),
                  op);
  } else {
    MOE_MPI_CHECK(MPI_Ialltoallv(m.send.data(), m.sc.data(), m.sd.data(), type, m.recv.data(),
                                 m.rc.data(), m.rd.data(), type, comm_.raw(), &m.request),
                  op);
  }
}

void Exchange::forward_finish(Movement& m, const DispatchPlan& plan, View out, bool self_in_recv) {
  MOE_CHECK(m.plan == &plan, name_, " exchange: dispatch wait without a matching start");
  const int64_t d = m.d;
  MOE_CHECK_SHAPE(out, plan.n_recv(), d, cat(name_, " exchange dispatch out"));
  if (m.request != MPI_REQUEST_NULL)
    MOE_MPI_CHECK(MPI_Wait(&m.request, MPI_STATUS_IGNORE), cat(name_, " exchange dispatch wait"));
  m.plan = nullptr;
  const int me = comm_.rank();
  const std::vector<RowBlock>& blocks = plan.recv_blocks();
  const int64_t nb = static_cast<int64_t>(blocks.size());
  const float* recv = m.recv.data();
#pragma omp parallel for schedule(dynamic, 1) if (plan.n_recv() * d > kParallelCopyFloats)
  for (int64_t j = 0; j < nb; ++j) {
    const RowBlock& b = blocks[j];
    if (b.source == me && !self_in_recv) continue;
    copy_rows(recv + b.raw * d, d, out.row(b.grouped), out.ld, b.rows, d);
  }
  stats_.bytes_sent += m.pending_bytes;
  int64_t rows_in = 0;
  for (int v : m.rc) rows_in += v;
  stats_.bytes_received += rows_in * d * int64_t(sizeof(float));
}

// combine direction: expert-grouped rows y -> packed by (source) rank -> slot rows.
void Exchange::backward_start(Movement& m, const DispatchPlan& plan, ConstView y, bool direct_self,
                              View out) {
  MOE_CHECK(m.plan == nullptr, name_, " exchange: a combine is already in flight");
  const int me = comm_.rank();
  const int64_t d = y.cols;
  MOE_CHECK_SHAPE(y, plan.n_recv(), d, cat(name_, " exchange combine input"));
  if (direct_self)
    MOE_CHECK_SHAPE(out, plan.n_tokens() * plan.k(), d, cat(name_, " exchange combine out"));
  const MPI_Datatype type = row_type(d);
  m.d = d;
  ensure(m.send, plan.n_recv() * d);
  ensure(m.recv, plan.n_send() * d);

  const std::vector<int64_t>& slot = plan.send_slot();
  const int64_t self_begin = plan.send_displs()[me];
  const int64_t self_raw = plan.recv_displs()[me];
  const std::vector<RowBlock>& blocks = plan.recv_blocks();
  const int64_t nb = static_cast<int64_t>(blocks.size());
  float* send = m.send.data();
  float* recv = m.recv.data();
#pragma omp parallel for schedule(dynamic, 1) if (plan.n_recv() * d > kParallelCopyFloats)
  for (int64_t j = 0; j < nb; ++j) {
    const RowBlock& b = blocks[j];
    if (b.source != me) {
      copy_rows(y.row(b.grouped), y.ld, send + b.raw * d, d, b.rows, d);
    } else {
      const int64_t i0 = self_begin + (b.raw - self_raw);
      for (int64_t i = 0; i < b.rows; ++i)
        copy_row(y.row(b.grouped + i), direct_self ? out.row(slot[i0 + i]) : recv + (i0 + i) * d,
                 d);
    }
  }

  set_counts(m, plan.recv_counts(), plan.recv_displs(), plan.send_counts(), plan.send_displs(),
             "combine");
  m.plan = &plan;
  const std::string op = cat(name_, " exchange combine");
  if (direct_self) {
    MOE_MPI_CHECK(MPI_Alltoallv(m.send.data(), m.sc.data(), m.sd.data(), type, m.recv.data(),
                                m.rc.data(), m.rd.data(), type, comm_.raw()),
                  op);
  } else {
    MOE_MPI_CHECK(MPI_Ialltoallv(m.send.data(), m.sc.data(), m.sd.data(), type, m.recv.data(),
                                 m.rc.data(), m.rd.data(), type, comm_.raw(), &m.request),
                  op);
  }
}

void Exchange::backward_finish(Movement& m, const DispatchPlan& plan, View out, bool self_in_recv) {
  MOE_CHECK(m.plan == &plan, name_, " exchange: combine wait without a matching start");
  const int64_t d = m.d;
  const int64_t S = plan.n_tokens() * plan.k();
  MOE_CHECK_SHAPE(out, S, d, cat(name_, " exchange combine out"));
  if (m.request != MPI_REQUEST_NULL)
    MOE_MPI_CHECK(MPI_Wait(&m.request, MPI_STATUS_IGNORE), cat(name_, " exchange combine wait"));
  m.plan = nullptr;
  const int me = comm_.rank();
  const std::vector<int64_t>& slot = plan.send_slot();
  const int64_t self_begin = plan.send_displs()[me];
  const int64_t self_end = self_begin + plan.send_counts()[me];
  const int64_t n_send = plan.n_send();
  const float* recv = m.recv.data();
  const std::vector<uint8_t>& kept = plan.kept();
#pragma omp parallel if (S * d > kParallelCopyFloats)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_send; ++i) {
      if (!self_in_recv && i >= self_begin && i < self_end) continue;
      copy_row(recv + i * d, out.row(slot[i]), d);
    }
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s)
      if (!kept[s]) std::memset(out.row(s), 0, static_cast<size_t>(d) * sizeof(float));
  }
  stats_.bytes_sent += m.pending_bytes;
  int64_t rows_in = 0;
  for (int v : m.rc) rows_in += v;
  stats_.bytes_received += rows_in * d * int64_t(sizeof(float));
}

void Exchange::dispatch(const DispatchPlan& plan, ConstView x, View out) {
  const double t0 = wall_s();
  forward_start(dispatch_, plan, x, /*by_slot=*/false, /*direct_self=*/true, out);
  forward_finish(dispatch_, plan, out, /*self_in_recv=*/false);
  stats_.seconds += wall_s() - t0;
}

void Exchange::dispatch_slots(const DispatchPlan& plan, ConstView s, View out) {
  const double t0 = wall_s();
  forward_start(dispatch_, plan, s, /*by_slot=*/true, /*direct_self=*/true, out);
  forward_finish(dispatch_, plan, out, /*self_in_recv=*/false);
  stats_.seconds += wall_s() - t0;
}

void Exchange::combine(const DispatchPlan& plan, ConstView y, View out) {
  const double t0 = wall_s();
  backward_start(combine_, plan, y, /*direct_self=*/true, out);
  backward_finish(combine_, plan, out, /*self_in_recv=*/false);
  stats_.seconds += wall_s() - t0;
}

void Exchange::dispatch_start(const DispatchPlan& plan, ConstView x) {
  const double t0 = wall_s();
  forward_start(dispatch_, plan, x, /*by_slot=*/false, /*direct_self=*/false, View());
  stats_.seconds += wall_s() - t0;
}

void Exchange::dispatch_slots_start(const DispatchPlan& plan, ConstView s) {
  const double t0 = wall_s();
  forward_start(dispatch_, plan, s, /*by_slot=*/true, /*direct_self=*/false, View());
  stats_.seconds += wall_s() - t0;
}

void Exchange::dispatch_wait(const DispatchPlan& plan, View out) {
  const double t0 = wall_s();
  forward_finish(dispatch_, plan, out, /*self_in_recv=*/true);
  stats_.seconds += wall_s() - t0;
}

void Exchange::combine_start(const DispatchPlan& plan, ConstView y) {
  const double t0 = wall_s();
  backward_start(combine_, plan, y, /*direct_self=*/false, View());
  stats_.seconds += wall_s() - t0;
}

void Exchange::combine_wait(const DispatchPlan& plan, View out) {
  const double t0 = wall_s();
  backward_finish(combine_, plan, out, /*self_in_recv=*/true);
  stats_.seconds += wall_s() - t0;
}

}  // namespace moe::comm
