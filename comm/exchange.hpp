// File: exchange.hpp — the All2All data movement of an MoE layer, given a DispatchPlan.
//
// Notation as in plan.hpp: T tokens, k slots per token, d width, R received rows.
//
//   dispatch:  x [T, d]  ->  expert_in [R, d]   rows grouped by local expert (plan.recv_offsets)
//   combine:   expert_out [R, d]  ->  slot_out [T*k, d]  (the rows come home, one per slot;
//              dropped/empty slots are zero)
// The weighted sum y_t = sum_j w_tj * slot_out[t*k + j] is local and lives in the MoE layer,
// which also keeps slot_out for the router's backward (dL/dw_tj = <dy_t, slot_out[t*k+j]>).
//
// Backward uses the same two movements in the other direction:
//   dispatch^T = combine_rows(d expert_in) summed per token   (dx_t = sum_j d slot_in[t*k + j])
//   combine^T  = dispatch_rows(d slot_out)                     (w-scaled dy per slot)
// so the exchange offers the two primitive row movements on slots:
//   send_rows:  slot rows [T*k, d] (or token rows [T, d] with k-fold fan-out) -> [R, d]
//   return_rows: [R, d] -> slot rows [T*k, d]
// All calls are collective over the plan's communicator: every rank calls them in the same
// order, including ranks that send or receive nothing. MPI counts are in rows (an MPI datatype of
// d contiguous floats), so rows * d may exceed INT_MAX; more than INT_MAX rows to or from one
// rank is rejected with an Error(kComm) naming the exchange, never truncated.
//
// Copies. On one node (by the node layout, nodes()) the blocking flat calls send one message per
// non-empty (rank, local expert) block, received straight into (dispatch, dispatch_slots) or
// sent straight from (combine) the expert-grouped rows, which saves the regrouping copy of an
// MPI_Alltoallv into a by-rank buffer; across nodes they keep one MPI_Alltoallv (one message per
// rank). Row copies of a call that writes 4 MB or more use non-temporal (streaming) stores:
// rows that large are not read back from cache, and ordinary stores would first read every
// destination line into it.
//
// Node-local single-copy path. When every rank of the communicator is on one node, the
// *_shared calls move rows through MPI-3 shared-memory windows instead of MPI_Alltoallv: each
// rank owns an input window [R, d] (expert-grouped rows it receives) and an output window
// [R, d] (its experts' outputs). dispatch_shared has every sender copy each kept slot's token
// row straight into its final expert-grouped row of the owner's input window; combine_shared
// has every rank read its slot rows straight out of the owners' output windows. One copy per
// row, no packing, no regrouping; the results are bitwise those of dispatch / combine.
//   y_in = dispatch_shared(plan, x);            // [R, d] view of this rank's input window
//   View y = combine_buffer(plan, d);           // experts write their outputs here
//   experts(y_in -> y);
//   combine_shared(plan, slot_out);             // [T*k, d], zeros for dropped / empty slots
// Windows grow geometrically and collectively (every rank knows every rank's R from the plan);
// in steady state nothing is allocated. Synchronisation is a node barrier (with MPI_Win_sync)
// before rows are written into another rank's window and after, so the data is visible: two
// barriers per dispatch_shared (one after input_consumed() and a barrier since), one per
// combine_shared, and one in combine_buffer only when no barrier has passed since the previous
// combine_shared.
//
// Hierarchical (node-aware) path: algorithm kHierarchical makes dispatch, dispatch_slots and
// combine move rows in two MPI_Alltoallv phases over a node layout of N nodes x L ranks (from
// MPI_COMM_TYPE_SHARED, or forced with ranks_per_node), as a 2D all-to-all: rank (n, l) is
// local rank l of node n.
//   dispatch  phase 1, within node n:  (n, l) -> (n, l') the rows for every (m, l'), m = any node
//             phase 2, across nodes:   (n, l') -> (m, l') the rows of every (n, l) for (m, l')
//   combine   the same two phases reversed (phase 2 back, then phase 1 back).
// Each row crosses a node boundary at most once and makes at most one hop inside a node. Per
// rank, the messages that cross nodes drop from (N-1)*L (flat) to N-1; the bytes that cross
// nodes are the same as flat. The intermediate rank repacks the rows it relays, (l, m) blocks
// to (m, l) blocks: one extra copy. (A node-leader gather moves even fewer messages across
// nodes, N-1 per node, but every relayed row then makes two hops inside the node and one rank
// carries the node's traffic, so the 2D form is used.) Besides the plan's counts the
// intermediate needs its node peers' counts per (node, local rank): one MPI_Alltoall of N
// integers per peer inside the node, per call. Results are bitwise those of the flat path
// (rows are only copied). Every phase's count (rows to one peer) and displacement must fit in
// an int, as for the flat path: otherwise Error(kComm) naming the phase. The non-blocking
// *_start / *_wait forms always use the flat path.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/plan.hpp"
#include "runtime/tensor.hpp"

namespace moe::comm {

enum class ExchangeAlgorithm {
  kFlat,         // one MPI_Alltoallv over the communicator
  kHierarchical  // within the node, across nodes (see the top of this file)
};

struct ExchangeOptions {
  ExchangeAlgorithm algorithm = ExchangeAlgorithm::kFlat;
  // comm.ranks_per_node: 0 = nodes from MPI_COMM_TYPE_SHARED; N > 0 = consecutive blocks of N
  // ranks are one node (the node-local shared path is then off when that makes several nodes).
  int ranks_per_node = 0;
};

struct ExchangeStats {
  int64_t bytes_sent = 0;      // payload bytes this rank sent (excluding to itself), cumulative
  int64_t bytes_received = 0;  // cumulative
  double seconds = 0.0;        // wall time inside exchange calls, cumulative
  // Non-empty point-to-point payloads this rank sent to other ranks (all phases), cumulative.
  int64_t messages_sent = 0;
  // The part of bytes_sent / messages_sent that went to another node. Counted once the exchange
  // knows its node layout (after nodes() or a hierarchical call); 0 before.
  int64_t internode_bytes_sent = 0;
  int64_t internode_messages_sent = 0;
};

class Exchange {
 public:
  explicit Exchange(const Communicator& comm, std::string name = "moe",
                    ExchangeOptions options = {});
  ~Exchange();
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  // Movable while nothing is in flight (so layers holding one stay movable).
  Exchange(Exchange&& other) noexcept;

  // Token rows x [T, d] -> expert-grouped rows out [R, d]: each kept slot (t, j) sends row x_t.
  void dispatch(const DispatchPlan& plan, ConstView x, View out);
  // Slot rows s [T*k, d] -> expert-grouped rows out [R, d]: each kept slot sends its own row.
  // (combine^T: s is the weight-scaled output gradient per slot.)
  void dispatch_slots(const DispatchPlan& plan, ConstView s, View out);
  // Expert-grouped rows y [R, d] -> slot rows out [T*k, d]; empty or dropped slots get zeros.
  void combine(const DispatchPlan& plan, ConstView y, View out);

  // Non-blocking form used by the pipelined MoE layer: start a movement, do other work, wait.
  // At most one dispatch and one combine of each Exchange may be in flight at a time (they use
  // separate buffers, so a dispatch and a combine may overlap). The input view is packed by
  // start and may be reused at once; the plan must stay alive until wait. Results are bitwise
  // equal to the blocking calls. start and wait are both collective (in the same order on
  // every rank).
  void dispatch_start(const DispatchPlan& plan, ConstView x);
  void dispatch_slots_start(const DispatchPlan& plan, ConstView s);
  void dispatch_wait(const DispatchPlan& plan, View out);
  void combine_start(const DispatchPlan& plan, ConstView y);
  void combine_wait(const DispatchPlan& plan, View out);

  // ---- Algorithm and node layout ----
  // Selects how dispatch, dispatch_slots and combine move rows; must be the same on every rank
  // and not change while a movement is in flight. kHierarchical on nodes holding different
  // numbers of ranks throws Error(kConfig) on every rank at the next call.
  void set_algorithm(ExchangeAlgorithm algorithm) { options_.algorithm = algorithm; }
  ExchangeAlgorithm algorithm() const { return options_.algorithm; }
  // The node layout (options.ranks_per_node, else MPI). Collective on its first call (splits
  // the node and cross-node communicators); cached afterwards. Error(kConfig) on every rank
  // when ranks_per_node does not divide the communicator size.
  const NodeLayout& nodes() const;

  // ---- Node-local shared-memory path (see the top of this file) ----
  // True when every rank of the communicator is on one node (and ranks_per_node does not split
  // them into several). Collective on its first call
  // (it splits off the node communicator); a cached flag afterwards. When false, every *_shared
  // call throws Error(kInternal) on every rank and callers use the MPI path.
  bool shared_available() const;
  // Token rows x [T, d] -> [R, d] view of this rank's input window holding exactly what
  // dispatch(plan, x, out) writes to out. Valid until the next dispatch_shared or
  // dispatch_slots_shared on this Exchange (or its destruction); the caller may read it and
  // write nothing into it. Collective (node barriers; may re-allocate the input windows).
  ConstView dispatch_shared(const DispatchPlan& plan, ConstView x);
  // Slot rows s [T*k, d] -> [R, d] view, as dispatch_slots(plan, s, out) (combine^T). Same
  // lifetime and collectiveness as dispatch_shared; it reuses the same input window.
  ConstView dispatch_slots_shared(const DispatchPlan& plan, ConstView s);
  // Local: this rank is done reading the view of the last dispatch_shared. When every rank has
  // said so and a node barrier has passed on this exchange since (combine_shared's, say), the
  // next dispatch_shared skips its first barrier. Call it on every rank alike or on none.
  void input_consumed();
  // [R, d] view of this rank's output window, for the experts to write their outputs into.
  // Collective: before returning, every rank has finished reading the previous combine_shared
  // (a node barrier, skipped when one already passed on this exchange since, as in a
  // dispatch_shared -> combine_buffer -> combine_shared round); it may re-allocate the output
  // windows. Contents are unspecified on return. Valid until the next combine_buffer on this
  // Exchange; the rows must be written before combine_shared.
  View combine_buffer(const DispatchPlan& plan, int64_t d);
  // Slot rows out [T*k, d] read straight from the owners' output windows, as
  // combine(plan, y, out) with y the rows written into combine_buffer(plan, d); dropped and
  // empty slots get zeros. Must follow combine_buffer with the same plan (on every rank).
  // Collective (one node barrier).
  void combine_shared(const DispatchPlan& plan, View out);

  const ExchangeStats& stats() const { return stats_; }
  const Communicator& comm() const { return comm_; }

 private:
  // One direction's reusable buffers and in-flight state. Rows for this rank itself never go
  // through MPI: they are copied directly (blocking) or through the receive buffer (start/wait).
  struct Movement {
    Tensor send, recv;  // >= [rows, d] packed rows in raw (by-rank) order; grown, never shrunk
    std::vector<int> sc, sd, rc, rd;  // [P] MPI counts / displacements, in rows
    MPI_Request request = MPI_REQUEST_NULL;
    const DispatchPlan* plan = nullptr;  // set while in flight
    int64_t d = 0;
    int64_t pending_bytes = 0;
    ExchangeStats pending;  // message / internode counts of the movement in flight
    bool in_place = false;  // blocking forward: peers' rows were received in grouped places
    std::vector<MPI_Request> block_requests;  // post_blocks
  };
  // Point-to-point tags of the blocking per-block movements (post_blocks).
  static constexpr int kDispatchTag = 0x4d6f;
  static constexpr int kCombineTag = 0x4d70;
  void forward_start(Movement& m, const DispatchPlan& plan, ConstView src, bool by_slot,
                     bool direct_self, View out);
  void post(Movement& m, MPI_Datatype type, bool blocking, const std::string& op);
  // Whether blocking flat movements send one message per (rank, local expert) block (post_blocks):
  // on one node, where a message costs little and the saved copy matters. Across nodes the flat
  // path keeps one message per rank. Collective on the first call (nodes()).
  bool blocks_in_place() const;
  void post_blocks(Movement& m, const DispatchPlan& plan, MPI_Datatype type, bool forward,
                   float* packed, float* grouped, bool grouped_layout, const std::string& op);
  void forward_finish(Movement& m, const DispatchPlan& plan, View out, bool self_in_recv);
  void backward_start(Movement& m, const DispatchPlan& plan, ConstView y, bool direct_self,
                      View out);
  void backward_finish(Movement& m, const DispatchPlan& plan, View out, bool self_in_recv);
  void set_counts(Movement& m, const std::vector<int64_t>& send_counts,
                  const std::vector<int64_t>& send_displs, const std::vector<int64_t>& recv_counts,
                  const std::vector<int64_t>& recv_displs, const char* what);
  MPI_Datatype row_type(int64_t d);
  struct Shared;  // node communicator and shared windows (exchange.cpp)
  Shared& shared(const char* what);
  ConstView shared_forward(const DispatchPlan& plan, ConstView src, bool by_slot);
  struct Hier;  // node layout, node / cross-node communicators, phase buffers (exchange.cpp)
  Hier& hier(const char* what);
  void hier_forward(const DispatchPlan& plan, ConstView src, bool by_slot, View out);
  void hier_backward(const DispatchPlan& plan, ConstView y, View out);
  // Adds the messages (non-empty counts to other ranks) and internode figures of one MPI call to
  // `into`; counts [peers] in rows of d floats, peer_rank[i] = communicator rank of peer i
  // (nullptr: the identity).
  void count_traffic(const std::vector<int>& counts, const int* peer_rank, int64_t d,
                     ExchangeStats& into) const;

  const Communicator& comm_;
  std::string name_;
  ExchangeOptions options_;
  ExchangeStats stats_;
  Movement dispatch_, combine_;
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;  // d contiguous floats: counts are rows
  int64_t row_type_d_ = 0;
  // Created by the first shared_available() or *_shared call. Destroying an Exchange whose
  // windows exist is collective over the node (MPI_Win_free), as its construction was.
  mutable std::unique_ptr<Shared> shared_;
  // Created by the first nodes() or hierarchical call (collective, as for shared_).
  mutable std::unique_ptr<Hier> hier_;
};

}  // namespace moe::comm
