#include "comm/exchange.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
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

// Shared-path row copies are split into this many contiguous chunks of send rows when they run
// on several threads (enough for uneven blocks to balance over 1-4 threads).
constexpr int64_t kCopyChunks = 32;

// Calls f(block, i) for every send row i in [0, n), where `blocks` cover [0, n) in order; over
// OpenMP threads, in contiguous chunks of rows, when there are many floats to copy.
template <typename F>
void for_each_send_row(const std::vector<SendBlock>& blocks, int64_t n, int64_t d, const F& f) {
  const int64_t chunks = n * d > kParallelCopyFloats ? kCopyChunks : 1;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t i = n * c / chunks;
    const int64_t end = n * (c + 1) / chunks;
    if (i >= end) continue;
    auto b = std::upper_bound(blocks.begin(), blocks.end(), i,
                              [](int64_t row, const SendBlock& x) { return row < x.send; }) -
             1;
    for (; i < end; ++b)
      for (const int64_t stop = std::min(end, b->send + b->rows); i < stop; ++i) f(*b, i);
  }
}

// Grows t to hold at least n floats. Tensor::resize zero-fills on every call, which would cost a
// full pass over the buffer per exchange, so it is only called when the buffer must grow.
void ensure(Tensor& t, int64_t n) {
  if (t.numel() < n) t.resize({n});
}

}  // namespace

// One MPI-3 shared-memory window over the node: every rank owns a segment of `capacity`
// floats (the same on every rank), mapped into every process of the node.
struct SharedWindow {
  MPI_Win win = MPI_WIN_NULL;
  int64_t capacity = 0;      // floats per rank
  std::vector<float*> base;  // [P] each rank's segment in this process, by communicator rank
  float* of(int rank) const { return win == MPI_WIN_NULL ? nullptr : base[rank]; }
};

struct Exchange::Shared {
  Communicator node;           // the ranks on this node (== the exchange's ranks when available)
  bool available = false;      // node.size() == comm.size()
  std::vector<int> node_rank;  // [P] communicator rank -> node rank
  SharedWindow in, out;        // dispatched rows; expert outputs
  const DispatchPlan* combine_plan = nullptr;  // set by combine_buffer, cleared by combine_shared
  int64_t combine_d = 0;
  // Node barriers passed so far, and the count when the last combine_shared finished reading.
  // Identical on every rank (the calls are collective), so decisions based on them agree.
  int64_t barriers = 0;
  int64_t combine_read_at = -1;
  int64_t input_done_at = -1;  // barriers when input_consumed() was last called; -1: not since

  Shared() = default;
  Shared(const Shared&) = delete;
  Shared& operator=(const Shared&) = delete;
  ~Shared() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // Unwinding from an error: the job is about to abort, and a collective free could hang.
    if (finalized || std::uncaught_exceptions() > 0) return;
    for (SharedWindow* w : {&in, &out}) {
      if (w->win == MPI_WIN_NULL) continue;
      MPI_Win_unlock_all(w->win);
      MPI_Win_free(&w->win);
    }
  }

  // Collective over the node: frees the window.
  void release(SharedWindow& w, const std::string& what) {
    if (w.win == MPI_WIN_NULL) return;
    MOE_MPI_CHECK(MPI_Win_unlock_all(w.win), what);
    MOE_MPI_CHECK(MPI_Win_free(&w.win), what);
    w.win = MPI_WIN_NULL;
    w.capacity = 0;
  }

  // Collective over the node: makes every segment hold at least `need` floats. Every rank
  // passes the same need (derived from every rank's R), so all decide alike; growth is
  // geometric, so a steady state allocates nothing.
  void grow(SharedWindow& w, int64_t need, const std::string& what) {
    if (need <= w.capacity) return;
    const int64_t cap = std::max(need + need / 8, 2 * w.capacity);
    release(w, what);
    MPI_Info info;
    MOE_MPI_CHECK(MPI_Info_create(&info), what);
    // Page-aligned per-rank segments: each may then live on its owner's NUMA node.
    MOE_MPI_CHECK(MPI_Info_set(info, "alloc_shared_noncontig", "true"), what);
    float* mine = nullptr;
    const int rc = MPI_Win_allocate_shared(static_cast<MPI_Aint>(cap * int64_t(sizeof(float))),
                                           int(sizeof(float)), info, node.raw(), &mine, &w.win);
    MOE_MPI_CHECK(MPI_Info_free(&info), what);
    MOE_MPI_CHECK(rc, cat(what, ": allocate ", cap * int64_t(sizeof(float)), " bytes per rank"));
    MOE_MPI_CHECK(MPI_Win_set_errhandler(w.win, MPI_ERRORS_RETURN), what);
    w.base.assign(node_rank.size(), nullptr);
    for (size_t q = 0; q < node_rank.size(); ++q) {
      MPI_Aint bytes = 0;
      int unit = 0;
      void* p = nullptr;
      MOE_MPI_CHECK(MPI_Win_shared_query(w.win, node_rank[q], &bytes, &unit, &p), what);
      w.base[q] = static_cast<float*>(p);
    }
    MOE_MPI_CHECK(MPI_Win_lock_all(MPI_MODE_NOCHECK, w.win), what);
    w.capacity = cap;
  }

  // Collective over the node: a memory fence, a barrier, a fence. Stores before it on any rank
  // are visible to loads after it on every rank, and loads before it are done before any
  // store after it.
  void sync(const SharedWindow& w, const std::string& what) {
    if (w.win != MPI_WIN_NULL) MOE_MPI_CHECK(MPI_Win_sync(w.win), what);
    node.barrier(what.c_str());
    ++barriers;
    if (w.win != MPI_WIN_NULL) MOE_MPI_CHECK(MPI_Win_sync(w.win), what);
  }
};

Exchange::Exchange(const Communicator& comm, std::string name)
    : comm_(comm), name_(std::move(name)) {}

Exchange::Exchange(Exchange&& o) noexcept
    : comm_(o.comm_),
      name_(std::move(o.name_)),
      stats_(o.stats_),
      dispatch_(std::move(o.dispatch_)),
      combine_(std::move(o.combine_)),
      row_type_(std::exchange(o.row_type_, MPI_DATATYPE_NULL)),
      row_type_d_(std::exchange(o.row_type_d_, 0)),
      shared_(std::move(o.shared_)) {
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
  post(m, type, direct_self, op);
}

// The one MPI call of a movement: blocking when the caller waits right away, else non-blocking.
void Exchange::post(Movement& m, MPI_Datatype type, bool blocking, const std::string& op) {
  if (blocking) {
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
  post(m, type, direct_self, op);
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

namespace moe::comm {

namespace {

int64_t max_recv_rows(const DispatchPlan& plan) {
  const std::vector<int64_t>& r = plan.rank_recv_rows();
  return r.empty() ? 0 : *std::max_element(r.begin(), r.end());
}

}  // namespace

bool Exchange::shared_available() const {
  if (!shared_) {
    auto sh = std::make_unique<Shared>();
    sh->node = comm_.split_node();
    sh->available = sh->node.size() == comm_.size();
    if (sh->available) {
      const int P = comm_.size();
      std::vector<int> ranks(static_cast<size_t>(P));
      for (int q = 0; q < P; ++q) ranks[q] = q;
      sh->node_rank.assign(static_cast<size_t>(P), 0);
      MPI_Group all, node;
      const std::string what = cat(name_, " exchange: node ranks");
      MOE_MPI_CHECK(MPI_Comm_group(comm_.raw(), &all), what);
      MOE_MPI_CHECK(MPI_Comm_group(sh->node.raw(), &node), what);
      MOE_MPI_CHECK(MPI_Group_translate_ranks(all, P, ranks.data(), node, sh->node_rank.data()),
                    what);
      MOE_MPI_CHECK(MPI_Group_free(&node), what);
      MOE_MPI_CHECK(MPI_Group_free(&all), what);
    }
    shared_ = std::move(sh);
  }
  return shared_->available;
}

Exchange::Shared& Exchange::shared(const char* what) {
  if (!shared_available())
    throw Error(
        ErrorKind::kInternal,
        cat(name_, " exchange ", what, ": the shared-memory path needs every rank on one node (",
            comm_.size(), " ranks, ", shared_->node.size(), " on this node); use the MPI path"));
  return *shared_;
}

ConstView Exchange::shared_forward(const DispatchPlan& plan, ConstView src, bool by_slot) {
  const double t0 = wall_s();
  const char* what = by_slot ? "dispatch_slots_shared" : "dispatch_shared";
  Shared& sh = shared(what);
  const int me = comm_.rank();
  const int k = plan.k();
  const int64_t d = src.cols;
  MOE_CHECK_SHAPE(src, by_slot ? plan.n_tokens() * k : plan.n_tokens(), d,
                  cat(name_, " exchange ", what, " input"));
  MOE_CHECK(plan.rank_recv_rows().size() == size_t(comm_.size()), name_, " exchange ", what,
            ": the plan is for ", plan.rank_recv_rows().size(), " ranks, the exchange has ",
            comm_.size());
  const std::string op = cat(name_, " exchange ", what);
  sh.grow(sh.in, max_recv_rows(plan) * d, op);
  // Every rank is done with the rows of the previous dispatch (known already when they said so
  // and a barrier has passed since).
  if (sh.input_done_at < 0 || sh.barriers <= sh.input_done_at) sh.sync(sh.in, op);
  sh.input_done_at = -1;

  const std::vector<int64_t>& slot = plan.send_slot();
  const std::vector<float*>& base = sh.in.base;
  const int kk = by_slot ? 1 : k;  // src row of send row i: slot[i] / kk
  for_each_send_row(plan.send_blocks(), plan.n_send(), d, [&](const SendBlock& b, int64_t i) {
    copy_row(src.row(slot[i] / kk), base[b.dest] + (b.dest_row + (i - b.send)) * d, d);
  });
  sh.sync(sh.in, op);  // the rows are visible to their owners

  const int64_t row_bytes = d * int64_t(sizeof(float));
  stats_.bytes_sent += (plan.n_send() - plan.send_counts()[me]) * row_bytes;
  stats_.bytes_received += (plan.n_recv() - plan.recv_counts()[me]) * row_bytes;
  stats_.seconds += wall_s() - t0;
  return ConstView(sh.in.of(me), plan.n_recv(), d);
}

ConstView Exchange::dispatch_shared(const DispatchPlan& plan, ConstView x) {
  return shared_forward(plan, x, /*by_slot=*/false);
}

ConstView Exchange::dispatch_slots_shared(const DispatchPlan& plan, ConstView s) {
  return shared_forward(plan, s, /*by_slot=*/true);
}

void Exchange::input_consumed() {
  if (shared_) shared_->input_done_at = shared_->barriers;
}

View Exchange::combine_buffer(const DispatchPlan& plan, int64_t d) {
  const double t0 = wall_s();
  Shared& sh = shared("combine_buffer");
  MOE_CHECK(d >= 0, name_, " exchange combine_buffer: negative width ", d);
  MOE_CHECK(plan.rank_recv_rows().size() == size_t(comm_.size()), name_,
            " exchange combine_buffer: the plan is for ", plan.rank_recv_rows().size(),
            " ranks, the exchange has ", comm_.size());
  const std::string op = cat(name_, " exchange combine_buffer");
  sh.grow(sh.out, max_recv_rows(plan) * d, op);
  // Every rank must be done reading the previous combine's rows before this rank overwrites
  // its own. Each rank reads before its next barrier on this exchange, so a barrier passed
  // since then (e.g. dispatch_shared's) already guarantees it.
  if (sh.barriers <= sh.combine_read_at) sh.sync(sh.out, op);
  sh.combine_plan = &plan;
  sh.combine_d = d;
  stats_.seconds += wall_s() - t0;
  return View(sh.out.of(comm_.rank()), plan.n_recv(), d);
}

void Exchange::combine_shared(const DispatchPlan& plan, View out) {
  const double t0 = wall_s();
  Shared& sh = shared("combine_shared");
  MOE_CHECK(sh.combine_plan == &plan, name_,
            " exchange: combine_shared without a matching combine_buffer");
  const int me = comm_.rank();
  const int64_t d = sh.combine_d;
  const int64_t S = plan.n_tokens() * plan.k();
  MOE_CHECK_SHAPE(out, S, d, cat(name_, " exchange combine_shared out"));
  sh.combine_plan = nullptr;
  const std::string op = cat(name_, " exchange combine_shared");
  sh.sync(sh.out, op);  // the experts' outputs are visible

  const std::vector<int64_t>& slot = plan.send_slot();
  const std::vector<float*>& base = sh.out.base;
  for_each_send_row(plan.send_blocks(), plan.n_send(), d, [&](const SendBlock& b, int64_t i) {
    copy_row(base[b.dest] + (b.dest_row + (i - b.send)) * d, out.row(slot[i]), d);
  });
  sh.combine_read_at = sh.barriers;
  const std::vector<uint8_t>& kept = plan.kept();
  if (plan.n_send() < S) {
#pragma omp parallel for schedule(static) if (S * d > kParallelCopyFloats)
    for (int64_t s = 0; s < S; ++s)
      if (!kept[s]) std::memset(out.row(s), 0, static_cast<size_t>(d) * sizeof(float));
  }

  const int64_t row_bytes = d * int64_t(sizeof(float));
  stats_.bytes_sent += (plan.n_recv() - plan.recv_counts()[me]) * row_bytes;
  stats_.bytes_received += (plan.n_send() - plan.send_counts()[me]) * row_bytes;
  stats_.seconds += wall_s() - t0;
}

}  // namespace moe::comm
