#include "comm/exchange.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <utility>

#include "runtime/error.hpp"

#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace moe::comm {

namespace {

// Row copies below this many floats run on one thread: the OpenMP fork costs more than it saves.
constexpr int64_t kParallelCopyFloats = int64_t{1} << 18;

double wall_s() {
  return MPI_Wtime();
}

// Movements whose copies write at least this many bytes use non-temporal (streaming) stores:
// the destination rows are not read into the cache first and do not evict the source. On this
// project's machines ordinary stores into rows that are not cached ran 2-20x slower than
// streaming ones (the write-allocate reads), while below a few MB, when the rows stay in cache
// for the next step, ordinary stores are faster.
constexpr int64_t kStreamBytes = int64_t{4} << 20;

inline bool streams(int64_t floats) {
  return floats * int64_t(sizeof(float)) >= kStreamBytes;
}

// Streaming copy of n floats: non-temporal vector stores from the first aligned position, plain
// copies of the unaligned head and the tail. Bitwise a copy. Callers make the rows visible with
// store_fence() on the same thread before another thread or process may read them.
void stream_copy(const float* src, float* dst, int64_t n) {
#if defined(__AVX512F__) || defined(__AVX__)
#if defined(__AVX512F__)
  constexpr int64_t kLanes = 16;
#else
  constexpr int64_t kLanes = 8;
#endif
  constexpr uintptr_t kAlign = kLanes * sizeof(float);
  const uintptr_t mis = reinterpret_cast<uintptr_t>(dst) % kAlign;
  if (mis % sizeof(float) != 0) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const int64_t head = std::min<int64_t>(n, mis ? int64_t((kAlign - mis) / sizeof(float)) : 0);
  if (head > 0) std::memcpy(dst, src, static_cast<size_t>(head) * sizeof(float));
  int64_t i = head;
  for (; i + kLanes <= n; i += kLanes) {
#if defined(__AVX512F__)
    _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
    _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  }
  if (i < n) std::memcpy(dst + i, src + i, static_cast<size_t>(n - i) * sizeof(float));
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
#endif
}

// Orders this thread's streaming stores before its later stores (flags, barriers, MPI calls).
inline void store_fence(bool stream) {
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

inline void copy_row(const float* src, float* dst, int64_t d, bool stream = false) {
  if (stream) {
    stream_copy(src, dst, d);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(float));
  }
}

// rows [0, n) of src -> rows [0, n) of dst, as one block copy when both are contiguous.
void copy_rows(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t n, int64_t d,
               bool stream = false) {
  if (n <= 0) return;
  if (src_ld == d && dst_ld == d) {
    copy_row(src, dst, n * d, stream);
    return;
  }
  for (int64_t i = 0; i < n; ++i) copy_row(src + i * src_ld, dst + i * dst_ld, d, stream);
}

// Shared-path row copies are split into this many contiguous chunks of send rows when they run
// on several threads (enough for uneven blocks to balance over 1-4 threads).
constexpr int64_t kCopyChunks = 32;

// Calls f(block, i) for every send row i in [0, n), where `blocks` cover [0, n) in order; over
// OpenMP threads, in contiguous chunks of rows, when there are many floats to copy. With
// `stream`, every thread fences its streaming stores when done.
template <typename F>
void for_each_send_row(const std::vector<SendBlock>& blocks, int64_t n, int64_t d, bool stream,
                       const F& f) {
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
    store_fence(stream);
  }
}

// in [n] (rows) -> out [n] as MPI int counts; a value above the MPI count limit is an
// Error(kComm) naming the exchange, the movement and the peer, never truncated.
void mpi_counts(const std::vector<int64_t>& in, std::vector<int>& out, const std::string& name,
                const std::string& what, const char* peer) {
  out.resize(in.size());
  for (size_t q = 0; q < in.size(); ++q) {
    if (in[q] > kMaxMpiCount)
      throw Error(ErrorKind::kComm, cat(name, " exchange (", what, "): ", in[q], " rows for ", peer,
                                        " ", q, " exceed the MPI count limit ", kMaxMpiCount,
                                        "; use more ranks or fewer tokens per step"));
    out[q] = static_cast<int>(in[q]);
  }
}

// counts [n] -> exclusive prefix sums [n].
std::vector<int64_t> displs_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> out(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) out[i] = out[i - 1] + counts[i - 1];
  return out;
}

void add_traffic(ExchangeStats& into, const ExchangeStats& s) {
  into.messages_sent += s.messages_sent;
  into.internode_bytes_sent += s.internode_bytes_sent;
  into.internode_messages_sent += s.internode_messages_sent;
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

Exchange::Exchange(const Communicator& comm, std::string name, ExchangeOptions options)
    : comm_(comm), name_(std::move(name)), options_(options) {}

Exchange::Exchange(Exchange&& o) noexcept
    : comm_(o.comm_),
      name_(std::move(o.name_)),
      options_(o.options_),
      stats_(o.stats_),
      dispatch_(std::move(o.dispatch_)),
      combine_(std::move(o.combine_)),
      row_type_(std::exchange(o.row_type_, MPI_DATATYPE_NULL)),
      row_type_d_(std::exchange(o.row_type_d_, 0)),
      shared_(std::move(o.shared_)),
      hier_(std::move(o.hier_)) {
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
  mpi_counts(send_counts, m.sc, name_, what, "rank");
  mpi_counts(send_displs, m.sd, name_, what, "rank");
  mpi_counts(recv_counts, m.rc, name_, what, "rank");
  mpi_counts(recv_displs, m.rd, name_, what, "rank");
  m.sc[me] = 0;  // rows for this rank itself are copied, not sent
  m.rc[me] = 0;
  int64_t rows = 0;
  for (int q = 0; q < P; ++q) rows += m.sc[q];
  m.pending_bytes = rows * m.d * int64_t(sizeof(float));
  m.pending = ExchangeStats{};
  count_traffic(m.sc, nullptr, m.d, m.pending);
}

void Exchange::count_traffic(const std::vector<int>& counts, const int* peer_rank, int64_t d,
                             ExchangeStats& into) const {
  const int me = comm_.rank();
  const NodeLayout* layout = hier_ ? &nodes() : nullptr;
  for (size_t i = 0; i < counts.size(); ++i) {
    const int q = peer_rank ? peer_rank[i] : static_cast<int>(i);
    if (q == me || counts[i] == 0) continue;
    ++into.messages_sent;
    if (layout && layout->node[q] != layout->node[me]) {
      ++into.internode_messages_sent;
      into.internode_bytes_sent += int64_t(counts[i]) * d * int64_t(sizeof(float));
    }
  }
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
  const bool stream = streams(n_send * d);
#pragma omp parallel if (n_send * d > kParallelCopyFloats)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_send; ++i) {
      if (i >= self_begin && i < self_end) continue;
      copy_row(src.row(slot[i] / kk), send + i * d, d, stream);
    }
    store_fence(stream);
  }
  // This rank's own rows: straight to their grouped place, or to the raw receive buffer.
  const int64_t self_raw = plan.recv_displs()[me];
  for (const RowBlock& b : plan.recv_blocks()) {
    if (b.source != me) continue;
    const int64_t i0 = self_begin + (b.raw - self_raw);
    float* dst = direct_self ? out.row(b.grouped) : m.recv.data() + b.raw * d;
    const int64_t ld = direct_self ? out.ld : d;
    for (int64_t i = 0; i < b.rows; ++i)
      copy_row(src.row(slot[i0 + i] / kk), dst + i * ld, d, stream);
  }
  store_fence(stream);

  set_counts(m, plan.send_counts(), plan.send_displs(), plan.recv_counts(), plan.recv_displs(),
             what);
  m.plan = &plan;
  const std::string op = cat(name_, " exchange ", what);
  // Blocking on one node: one message per block (the choice is the same on every rank), each
  // landing in its expert-grouped place when the output rows are contiguous.
  if (direct_self && blocks_in_place()) {
    m.in_place = out.ld == d;
    post_blocks(m, plan, type, /*forward=*/true, send, m.in_place ? out.data : m.recv.data(),
                m.in_place, op);
  } else {
    post(m, type, direct_self, op);
  }
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

bool Exchange::blocks_in_place() const {
  return comm_.size() > 1 && nodes().n_nodes == 1;
}

// Blocking, one message per non-empty (rank, local expert) block to or from another rank, so
// that the expert-grouped side needs no packing or regrouping copy: forward sends send-buffer
// rows (packed in send order) and receives straight into `grouped` [R, d]; backward sends
// straight from `grouped` and receives into `packed` in send order. With grouped_layout false,
// `grouped` is a by-rank (raw) buffer instead, addressed by the blocks' raw rows. Both sides list a
// pair's blocks in local expert order (send_blocks, recv_blocks), and messages between two ranks
// with one tag arrive in order, so each receive gets its block.
void Exchange::post_blocks(Movement& m, const DispatchPlan& plan, MPI_Datatype type, bool forward,
                           float* packed, float* grouped, bool grouped_layout,
                           const std::string& op) {
  const int me = comm_.rank();
  const int64_t d = m.d;
  const int tag = forward ? kDispatchTag : kCombineTag;
  std::vector<MPI_Request>& req = m.block_requests;
  req.clear();
  for (const RowBlock& b : plan.recv_blocks()) {  // the grouped side
    if (b.source == me) continue;
    req.emplace_back();
    float* p = grouped + (grouped_layout ? b.grouped : b.raw) * d;
    const int n = static_cast<int>(b.rows);
    if (forward) {
      MOE_MPI_CHECK(MPI_Irecv(p, n, type, b.source, tag, comm_.raw(), &req.back()), op);
    } else {
      MOE_MPI_CHECK(MPI_Isend(p, n, type, b.source, tag, comm_.raw(), &req.back()), op);
    }
  }
  for (const SendBlock& b : plan.send_blocks()) {  // the packed (send order) side
    if (b.dest == me) continue;
    req.emplace_back();
    float* p = packed + b.send * d;
    const int n = static_cast<int>(b.rows);
    if (forward) {
      MOE_MPI_CHECK(MPI_Isend(p, n, type, b.dest, tag, comm_.raw(), &req.back()), op);
    } else {
      MOE_MPI_CHECK(MPI_Irecv(p, n, type, b.dest, tag, comm_.raw(), &req.back()), op);
    }
  }
  // One message per block: recount the messages set_counts counted per rank.
  const NodeLayout* layout = hier_ ? &nodes() : nullptr;
  m.pending.messages_sent = m.pending.internode_messages_sent = 0;
  auto sent_to = [&](int q) {
    ++m.pending.messages_sent;
    if (layout && layout->node[q] != layout->node[me]) ++m.pending.internode_messages_sent;
  };
  if (forward) {
    for (const SendBlock& b : plan.send_blocks())
      if (b.dest != me) sent_to(b.dest);
  } else {
    for (const RowBlock& b : plan.recv_blocks())
      if (b.source != me) sent_to(b.source);
  }
  MOE_MPI_CHECK(MPI_Waitall(static_cast<int>(req.size()), req.data(), MPI_STATUSES_IGNORE), op);
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
  const bool in_place = std::exchange(m.in_place, false);  // rows from peers already in `out`
  const bool stream = streams(plan.n_recv() * d);
#pragma omp parallel if (plan.n_recv() * d > kParallelCopyFloats)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t j = 0; j < nb; ++j) {
      const RowBlock& b = blocks[j];
      if (b.source == me ? !self_in_recv : in_place) continue;
      copy_rows(recv + b.raw * d, d, out.row(b.grouped), out.ld, b.rows, d, stream);
    }
    store_fence(stream);
  }
  stats_.bytes_sent += m.pending_bytes;
  add_traffic(stats_, m.pending);
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
  const bool stream = streams(plan.n_recv() * d);
  // Blocking on one node: one message per block (the choice is the same on every rank), sent
  // straight from y when its rows are contiguous, so nothing is packed.
  const bool per_block = direct_self && blocks_in_place();
  const bool in_place = per_block && y.ld == d;
#pragma omp parallel if (plan.n_recv() * d > kParallelCopyFloats)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t j = 0; j < nb; ++j) {
      const RowBlock& b = blocks[j];
      if (b.source != me) {
        if (in_place) continue;
        copy_rows(y.row(b.grouped), y.ld, send + b.raw * d, d, b.rows, d, stream);
      } else {
        const int64_t i0 = self_begin + (b.raw - self_raw);
        for (int64_t i = 0; i < b.rows; ++i)
          copy_row(y.row(b.grouped + i), direct_self ? out.row(slot[i0 + i]) : recv + (i0 + i) * d,
                   d, stream);
      }
    }
    store_fence(stream);
  }

  set_counts(m, plan.recv_counts(), plan.recv_displs(), plan.send_counts(), plan.send_displs(),
             "combine");
  m.plan = &plan;
  const std::string op = cat(name_, " exchange combine");
  if (per_block) {
    post_blocks(m, plan, type, /*forward=*/false, recv,
                in_place ? const_cast<float*>(y.data) : send, in_place, op);
  } else {
    post(m, type, direct_self, op);
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
  const bool stream = streams(S * d);
#pragma omp parallel if (S * d > kParallelCopyFloats)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_send; ++i) {
      if (!self_in_recv && i >= self_begin && i < self_end) continue;
      copy_row(recv + i * d, out.row(slot[i]), d, stream);
    }
    store_fence(stream);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s)
      if (!kept[s]) std::memset(out.row(s), 0, static_cast<size_t>(d) * sizeof(float));
  }
  stats_.bytes_sent += m.pending_bytes;
  add_traffic(stats_, m.pending);
  int64_t rows_in = 0;
  for (int v : m.rc) rows_in += v;
  stats_.bytes_received += rows_in * d * int64_t(sizeof(float));
}

void Exchange::dispatch(const DispatchPlan& plan, ConstView x, View out) {
  if (options_.algorithm == ExchangeAlgorithm::kHierarchical)
    return hier_forward(plan, x, /*by_slot=*/false, out);
  const double t0 = wall_s();
  forward_start(dispatch_, plan, x, /*by_slot=*/false, /*direct_self=*/true, out);
  forward_finish(dispatch_, plan, out, /*self_in_recv=*/false);
  stats_.seconds += wall_s() - t0;
}

void Exchange::dispatch_slots(const DispatchPlan& plan, ConstView s, View out) {
  if (options_.algorithm == ExchangeAlgorithm::kHierarchical)
    return hier_forward(plan, s, /*by_slot=*/true, out);
  const double t0 = wall_s();
  forward_start(dispatch_, plan, s, /*by_slot=*/true, /*direct_self=*/true, out);
  forward_finish(dispatch_, plan, out, /*self_in_recv=*/false);
  stats_.seconds += wall_s() - t0;
}

void Exchange::combine(const DispatchPlan& plan, ConstView y, View out) {
  if (options_.algorithm == ExchangeAlgorithm::kHierarchical) return hier_backward(plan, y, out);
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
    // A forced layout of several "nodes" on one machine must not take the shared path.
    const int rpn = options_.ranks_per_node;
    sh->available = sh->node.size() == comm_.size() && (rpn <= 0 || rpn >= comm_.size());
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
            comm_.size(), " ranks, ", shared_->node.size(), " on this node",
            options_.ranks_per_node > 0 ? cat(", comm.ranks_per_node ", options_.ranks_per_node)
                                        : std::string(),
            "); use the MPI path"));
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
  const bool stream = streams(plan.n_send() * d);
  for_each_send_row(
      plan.send_blocks(), plan.n_send(), d, stream, [&](const SendBlock& b, int64_t i) {
        copy_row(src.row(slot[i] / kk), base[b.dest] + (b.dest_row + (i - b.send)) * d, d, stream);
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
  const bool stream = streams(plan.n_send() * d);
  for_each_send_row(
      plan.send_blocks(), plan.n_send(), d, stream, [&](const SendBlock& b, int64_t i) {
        copy_row(base[b.dest] + (b.dest_row + (i - b.send)) * d, out.row(slot[i]), d, stream);
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

namespace moe::comm {

// ---- Hierarchical (node-aware) path: a 2D all-to-all over N nodes x L ranks ----
//
// Layouts, in rows, at rank (n, l) of a call's plan:
//   edge   [n_send]  dispatch phase-1 send / combine phase-1 receive: the rows for destination
//                    (m, l') in blocks ordered by (l', m); dest_pos[q] is q's first row.
//   relay1 [sum from] phase-1 receive: block (l, m) = rows local rank l sends to (m, this l),
//                    ordered by (l, m) (relay_in).
//   relay2 [same]    phase-2 send: the same blocks ordered by (m, l) (relay_out).
//   far    [n_recv]  phase-2 receive: rows from source (m, l) ordered by (m, l); src_pos[q] is
//                    source q's first row, its rows in the source's send order (as the flat
//                    path's raw receive buffer), so plan.recv_blocks() regroup them.
// Blocks a phase would send to this rank itself skip MPI and the extra copy: rows for
// (m, this l) are packed straight into relay1, and relay1 blocks (l, this n) go straight to far.
struct Exchange::Hier {
  NodeLayout layout;
  Communicator node;            // this rank's node, ordered by local index
  Communicator cross;           // the ranks with this rank's local index, ordered by node
  std::vector<int> node_peer;   // [L] communicator rank of local rank l on this node
  std::vector<int> cross_peer;  // [N] communicator rank of this local index on node m
  std::vector<int> rank_at;     // [N*L] communicator rank of (node m, local l) at m*L + l

  // Per call (prepare): counts in rows.
  std::vector<int64_t> own;   // [L*N] own[l'*N + m]: rows this rank sends to (m, l')
  std::vector<int64_t> from;  // [L*N] from[l*N + m]: rows local l sends to (m, this l)
  std::vector<int64_t> relay_in, relay_out;  // [L*N] block (l, m) offsets in relay1 / relay2
  std::vector<int64_t> dest_pos, src_pos;    // [P]
  // MPI counts / displacements: phase 1 (node) edge side and relay side, phase 2 (cross)
  // relay side and far side.
  std::vector<int> c1e, d1e, c1r, d1r, c2r, d2r, c2f, d2f;
  int64_t rows1e = 0, rows1r = 0;  // phase-1 rows to / from other local ranks
  int64_t rows2r = 0, rows2f = 0;  // phase-2 rows to / from other nodes (the relay side sends)
  Tensor edge, relay1, relay2, far;

  // Collective over the node (one MPI_Alltoall of N counts per peer): every layout above for
  // plan.
  void prepare(const DispatchPlan& plan, const std::string& name, const std::string& op) {
    const int N = layout.n_nodes, L = layout.ranks_per_node, P = N * L;
    const int me_l = node.rank(), me_n = cross.rank();
    const std::vector<int64_t>& sc = plan.send_counts();
    const std::vector<int64_t>& rc = plan.recv_counts();
    own.assign(size_t(L) * N, 0);
    from.assign(size_t(L) * N, 0);
    for (int l = 0; l < L; ++l)
      for (int m = 0; m < N; ++m) own[size_t(l) * N + m] = sc[rank_at[size_t(m) * L + l]];
    MOE_MPI_CHECK(MPI_Alltoall(own.data(), N, MPI_INT64_T, from.data(), N, MPI_INT64_T, node.raw()),
                  cat(op, ": counts within the node"));

    std::vector<int64_t> e(size_t(L), 0), r1(size_t(L), 0), r2(size_t(N), 0), f(size_t(N), 0);
    dest_pos.assign(size_t(P), 0);
    src_pos.assign(size_t(P), 0);
    relay_in.assign(size_t(L) * N, 0);
    relay_out.assign(size_t(L) * N, 0);
    int64_t at = 0;
    for (int l = 0; l < L; ++l)
      for (int m = 0; m < N; ++m) {
        dest_pos[rank_at[size_t(m) * L + l]] = at;
        at += own[size_t(l) * N + m];
        e[l] += own[size_t(l) * N + m];
      }
    at = 0;
    for (int l = 0; l < L; ++l)
      for (int m = 0; m < N; ++m) {
        relay_in[size_t(l) * N + m] = at;
        at += from[size_t(l) * N + m];
        r1[l] += from[size_t(l) * N + m];
      }
    at = 0;
    for (int m = 0; m < N; ++m)
      for (int l = 0; l < L; ++l) {
        relay_out[size_t(l) * N + m] = at;
        at += from[size_t(l) * N + m];
        r2[m] += from[size_t(l) * N + m];
      }
    at = 0;
    for (int m = 0; m < N; ++m)
      for (int l = 0; l < L; ++l) {
        const int q = rank_at[size_t(m) * L + l];
        src_pos[q] = at;
        at += rc[q];
        f[m] += rc[q];
      }
    const std::string within = cat(op, " within the node"), across = cat(op, " across nodes");
    mpi_counts(e, c1e, name, within, "local rank");
    mpi_counts(displs_of(e), d1e, name, within, "local rank");
    mpi_counts(r1, c1r, name, within, "local rank");
    mpi_counts(displs_of(r1), d1r, name, within, "local rank");
    mpi_counts(r2, c2r, name, across, "node");
    mpi_counts(displs_of(r2), d2r, name, across, "node");
    mpi_counts(f, c2f, name, across, "node");
    mpi_counts(displs_of(f), d2f, name, across, "node");
    c1e[me_l] = c1r[me_l] = 0;  // copied directly (see the top of Hier)
    c2r[me_n] = c2f[me_n] = 0;
    rows1e = rows1r = rows2r = rows2f = 0;
    for (int l = 0; l < L; ++l)
      if (l != me_l) rows1e += e[l], rows1r += r1[l];
    for (int m = 0; m < N; ++m)
      if (m != me_n) rows2r += r2[m], rows2f += f[m];
  }

  // relay1 (l, m) blocks <-> relay2 (m, l) blocks; blocks (l, this node) <-> far.
  void relay(bool to_cross, int64_t d) {
    const int N = layout.n_nodes, L = layout.ranks_per_node, me_n = cross.rank();
    const int64_t nb = int64_t(L) * N;
    int64_t total = 0;
    for (int64_t b = 0; b < nb; ++b) total += from[b];
    const bool stream = streams(total * d);
#pragma omp parallel if (total * d > kParallelCopyFloats)
    {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t j = 0; j < nb; ++j) {
        const int l = static_cast<int>(j / N), m = static_cast<int>(j % N);
        float* in = relay1.data() + relay_in[j] * d;
        float* out = m == me_n ? far.data() + src_pos[rank_at[size_t(m) * L + l]] * d
                               : relay2.data() + relay_out[j] * d;
        if (to_cross) {
          copy_rows(in, d, out, d, from[j], d, stream);
        } else {
          copy_rows(out, d, in, d, from[j], d, stream);
        }
      }
      store_fence(stream);
    }
  }

  // Where send row i (destination q, first send row sq) lives between the edge and the relay:
  // in edge, or, for this rank's local index, already in relay1.
  float* edge_row(int q, int64_t i, int64_t sq, int64_t d) {
    const int N = layout.n_nodes, me_l = node.rank();
    if (layout.local[q] == me_l)
      return relay1.data() + (relay_in[size_t(me_l) * N + layout.node[q]] + i - sq) * d;
    return edge.data() + (dest_pos[q] + i - sq) * d;
  }

  void grow(const DispatchPlan& plan, int64_t d) {
    int64_t relayed = 0;
    for (int64_t v : from) relayed += v;
    ensure(edge, plan.n_send() * d);
    ensure(relay1, relayed * d);
    ensure(relay2, relayed * d);
    ensure(far, plan.n_recv() * d);
  }
};

const NodeLayout& Exchange::nodes() const {
  if (!hier_) {
    auto h = std::make_unique<Hier>();
    h->layout = node_layout(comm_, options_.ranks_per_node);
    const NodeLayout& lay = h->layout;
    const int me = comm_.rank();
    h->node = comm_.split(lay.node[me], lay.local[me]);
    h->cross = comm_.split(lay.local[me], lay.node[me]);
    if (lay.uniform()) {
      const int N = lay.n_nodes, L = lay.ranks_per_node;
      h->rank_at.assign(size_t(N) * L, 0);
      for (int q = 0; q < comm_.size(); ++q) h->rank_at[size_t(lay.node[q]) * L + lay.local[q]] = q;
      h->node_peer.assign(size_t(L), 0);
      h->cross_peer.assign(size_t(N), 0);
      for (int l = 0; l < L; ++l) h->node_peer[l] = h->rank_at[size_t(lay.node[me]) * L + l];
      for (int m = 0; m < N; ++m) h->cross_peer[m] = h->rank_at[size_t(m) * L + lay.local[me]];
    }
    hier_ = std::move(h);
  }
  return hier_->layout;
}

Exchange::Hier& Exchange::hier(const char* what) {
  const NodeLayout& lay = nodes();
  if (!lay.uniform())
    throw Error(ErrorKind::kConfig,
                cat(name_, " exchange ", what,
                    ": the hierarchical exchange needs the same number of ranks on every node, "
                    "but the ",
                    comm_.size(), " ranks are on ", lay.describe(),
                    "; set comm.exchange to alltoallv or set comm.ranks_per_node"));
  return *hier_;
}

namespace {

// The destination rank of send row i: the last rank whose rows start at or before i (ranks
// that receive nothing share their displacement with the next one).
inline int dest_of(const std::vector<int64_t>& send_displs, int64_t i) {
  return static_cast<int>(std::upper_bound(send_displs.begin(), send_displs.end(), i) -
                          send_displs.begin()) -
         1;
}

}  // namespace

void Exchange::hier_forward(const DispatchPlan& plan, ConstView src, bool by_slot, View out) {
  const double t0 = wall_s();
  const char* what = by_slot ? "dispatch_slots" : "dispatch";
  Hier& h = hier(what);
  const int k = plan.k();
  const int64_t d = src.cols;
  MOE_CHECK_SHAPE(src, by_slot ? plan.n_tokens() * k : plan.n_tokens(), d,
                  cat(name_, " exchange ", what, " input"));
  MOE_CHECK_SHAPE(out, plan.n_recv(), d, cat(name_, " exchange ", what, " out"));
  MOE_CHECK(plan.send_counts().size() == size_t(comm_.size()), name_, " exchange ", what,
            ": the plan is for ", plan.send_counts().size(), " ranks, the exchange has ",
            comm_.size());
  const MPI_Datatype type = row_type(d);
  const std::string op = cat(name_, " exchange ", what, " (hierarchical)");
  h.prepare(plan, name_, op);
  h.grow(plan, d);

  // Pack the edge layout: destination (m, l') rows in (l', m) block order.
  const std::vector<int64_t>& slot = plan.send_slot();
  const std::vector<int64_t>& sd = plan.send_displs();
  const int64_t n_send = plan.n_send();
  const int kk = by_slot ? 1 : k;  // src row of send row i: slot[i] / kk
  const bool stream = streams(n_send * d);
#pragma omp parallel if (n_send * d > kParallelCopyFloats)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_send; ++i) {
      const int q = dest_of(sd, i);
      copy_row(src.row(slot[i] / kk), h.edge_row(q, i, sd[q], d), d, stream);
    }
    store_fence(stream);
  }
  MOE_MPI_CHECK(MPI_Alltoallv(h.edge.data(), h.c1e.data(), h.d1e.data(), type, h.relay1.data(),
                              h.c1r.data(), h.d1r.data(), type, h.node.raw()),
                cat(op, " within the node"));
  h.relay(/*to_cross=*/true, d);
  MOE_MPI_CHECK(MPI_Alltoallv(h.relay2.data(), h.c2r.data(), h.d2r.data(), type, h.far.data(),
                              h.c2f.data(), h.d2f.data(), type, h.cross.raw()),
                cat(op, " across nodes"));
  // Regroup by local expert, as the flat path does from its raw receive buffer.
  const std::vector<RowBlock>& blocks = plan.recv_blocks();
  const std::vector<int64_t>& rd = plan.recv_displs();
  const int64_t nb = static_cast<int64_t>(blocks.size());
  const float* far = h.far.data();
  const bool stream_in = streams(plan.n_recv() * d);
#pragma omp parallel if (plan.n_recv() * d > kParallelCopyFloats)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t j = 0; j < nb; ++j) {
      const RowBlock& b = blocks[j];
      copy_rows(far + (h.src_pos[b.source] + b.raw - rd[b.source]) * d, d, out.row(b.grouped),
                out.ld, b.rows, d, stream_in);
    }
    store_fence(stream_in);
  }

  const int64_t row_bytes = d * int64_t(sizeof(float));
  stats_.bytes_sent += (h.rows1e + h.rows2r) * row_bytes;
  stats_.bytes_received += (h.rows1r + h.rows2f) * row_bytes;
  count_traffic(h.c1e, h.node_peer.data(), d, stats_);
  count_traffic(h.c2r, h.cross_peer.data(), d, stats_);
  stats_.seconds += wall_s() - t0;
}

void Exchange::hier_backward(const DispatchPlan& plan, ConstView y, View out) {
  const double t0 = wall_s();
  Hier& h = hier("combine");
  const int64_t d = y.cols;
  const int64_t S = plan.n_tokens() * plan.k();
  MOE_CHECK_SHAPE(y, plan.n_recv(), d, cat(name_, " exchange combine input"));
  MOE_CHECK_SHAPE(out, S, d, cat(name_, " exchange combine out"));
  MOE_CHECK(plan.send_counts().size() == size_t(comm_.size()), name_,
            " exchange combine: the plan is for ", plan.send_counts().size(),
            " ranks, the exchange has ", comm_.size());
  const MPI_Datatype type = row_type(d);
  const std::string op = cat(name_, " exchange combine (hierarchical)");
  h.prepare(plan, name_, op);
  h.grow(plan, d);

  // Pack the far layout: rows back to source (m, l) in (m, l) block order.
  const std::vector<RowBlock>& blocks = plan.recv_blocks();
  const std::vector<int64_t>& rd = plan.recv_displs();
  const int64_t nb = static_cast<int64_t>(blocks.size());
  float* far = h.far.data();
  const bool stream_far = streams(plan.n_recv() * d);
#pragma omp parallel if (plan.n_recv() * d > kParallelCopyFloats)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t j = 0; j < nb; ++j) {
      const RowBlock& b = blocks[j];
      copy_rows(y.row(b.grouped), y.ld, far + (h.src_pos[b.source] + b.raw - rd[b.source]) * d, d,
                b.rows, d, stream_far);
    }
    store_fence(stream_far);
  }
  MOE_MPI_CHECK(MPI_Alltoallv(far, h.c2f.data(), h.d2f.data(), type, h.relay2.data(), h.c2r.data(),
                              h.d2r.data(), type, h.cross.raw()),
                cat(op, " across nodes"));
  h.relay(/*to_cross=*/false, d);
  MOE_MPI_CHECK(MPI_Alltoallv(h.relay1.data(), h.c1r.data(), h.d1r.data(), type, h.edge.data(),
                              h.c1e.data(), h.d1e.data(), type, h.node.raw()),
                cat(op, " within the node"));
  // Unpack to slot rows; dropped and empty slots get zeros.
  const std::vector<int64_t>& slot = plan.send_slot();
  const std::vector<int64_t>& sd = plan.send_displs();
  const std::vector<uint8_t>& kept = plan.kept();
  const int64_t n_send = plan.n_send();
  const bool stream = streams(S * d);
#pragma omp parallel if (S * d > kParallelCopyFloats)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_send; ++i) {
      const int q = dest_of(sd, i);
      copy_row(h.edge_row(q, i, sd[q], d), out.row(slot[i]), d, stream);
    }
    store_fence(stream);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; ++s)
      if (!kept[s]) std::memset(out.row(s), 0, static_cast<size_t>(d) * sizeof(float));
  }

  const int64_t row_bytes = d * int64_t(sizeof(float));
  stats_.bytes_sent += (h.rows2f + h.rows1r) * row_bytes;
  stats_.bytes_received += (h.rows2r + h.rows1e) * row_bytes;
  count_traffic(h.c2f, h.cross_peer.data(), d, stats_);
  count_traffic(h.c1r, h.node_peer.data(), d, stats_);
  stats_.seconds += wall_s() - t0;
}

}  // namespace moe::comm
