// File: plan.hpp — DispatchPlan: who sends which token-slot to which rank and local expert.
//
// Notation: T = tokens on this rank, k = slots per token, S = T*k slots, d = model width,
// E = experts, E_l = local experts, P = ranks, R = rows this rank receives (kept slots routed to
// its experts, from all ranks).
//
// A routing decision is, per local token t and slot j < k, a global expert id (or -1 for "no
// expert": an empty slot) and a weight. The plan sorts the slots by (destination rank, local
// expert, source token, slot) — stable and deterministic — exchanges the per-(rank, expert)
// counts, and, in capacity mode, decides which slots are dropped. The plan is immutable and is
// reused by backward: combine^T is a dispatch of dy and dispatch^T is a combine of dx.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/placement.hpp"

namespace moe::comm {

// A borrowed routing decision: expert[t*k + j], weight[t*k + j] for t < n_tokens, j < k.
struct RoutingView {
  int64_t n_tokens = 0;
  int k = 0;
  const int32_t* expert = nullptr;  // [T, k] global expert id, or -1 for an empty slot
  const float* weight = nullptr;    // [T, k] combine weight (used to rank slots for drops)
};

struct PlanOptions {
  // 0: dropless (default). > 0: capacity mode, each expert takes at most
  // ceil(capacity_factor * k * T_global / E) slots over the global batch; overflow slots are
  // dropped lowest weight first, ties broken by (global token index, slot), identically on any
  // rank count.
  double capacity_factor = 0.0;
};

// Global per-call load statistics (identical on every rank).
struct LoadStats {
  std::vector<int64_t> expert_tokens;  // [E] kept slots per expert, global
  std::vector<int64_t> rank_tokens;    // [P] kept slots received per rank
  int64_t slots_total = 0;             // non-empty slots routed, global
  int64_t slots_dropped = 0;           // global
  double expert_imbalance = 0.0;       // max / mean over experts of expert_tokens
  double rank_imbalance = 0.0;         // max / mean over ranks of rank_tokens
  double drop_rate() const { return slots_total ? double(slots_dropped) / slots_total : 0.0; }
};

// A run of received rows that is contiguous both in the raw MPI receive buffer (grouped by
// source rank) and in the expert-grouped layout: the rows one source rank sent to one local
// expert. The exchange copies whole blocks instead of single rows.
struct RowBlock {
  int64_t grouped = 0;  // first row in the expert-grouped layout
  int64_t raw = 0;      // first row in the raw receive buffer
  int64_t rows = 0;
  int source = 0;  // source rank
};

// A run of sent rows that lands contiguously in one destination rank's expert-grouped layout:
// the rows this rank sends to one expert. Used by the node-local shared-memory exchange, where
// the sender writes (dispatch) or reads (combine) the destination's rows directly.
struct SendBlock {
  int64_t send = 0;      // first send row (index into send_slot())
  int64_t dest_row = 0;  // first row in the destination rank's expert-grouped layout [R_dest, d]
  int64_t rows = 0;
  int dest = 0;  // destination rank
};

class DispatchPlan {
 public:
  // With replicas (placement.has_replicas()), each slot goes to one instance of its expert,
  // chosen from this rank's slot order (plan.cpp: build_replicated), and the statistics stay per
  // expert; capacity mode then is an Error(kConfig).
  // Collective over comm: exchanges counts (MPI_Alltoall), sums them over lower ranks
  // (MPI_Exscan, for send_blocks) and, in capacity mode, the slot metadata needed for the global
  // drop decision. Dropless with a small count matrix (P x P x E_l up to 16k counts: decode
  // steps, small clusters), one MPI_Allgather of the counts does all of it instead. Every rank
  // calls it, even with T = 0.
  static DispatchPlan build(const RoutingView& routing, const ExpertPlacement& placement,
                            const PlanOptions& options, const Communicator& comm);

  int64_t n_tokens() const { return n_tokens_; }
  int k() const { return k_; }
  // Rows this rank sends (kept slots) and receives.
  int64_t n_send() const { return static_cast<int64_t>(send_slot_.size()); }
  int64_t n_recv() const { return recv_offsets_.empty() ? 0 : recv_offsets_.back(); }
  // send_slot()[i]: the slot index t*k + j whose token row is the i-th row sent, in
  // (rank, local expert, token, slot) order.
  const std::vector<int64_t>& send_slot() const { return send_slot_; }
  // Per destination / source rank row counts and displacements (rows, not bytes). [P]
  const std::vector<int64_t>& send_counts() const { return send_counts_; }
  const std::vector<int64_t>& send_displs() const { return send_displs_; }
  const std::vector<int64_t>& recv_counts() const { return recv_counts_; }
  const std::vector<int64_t>& recv_displs() const { return recv_displs_; }
  // Received rows are regrouped so that local expert e's rows are [recv_offsets[e],
  // recv_offsets[e+1]), ordered by (source rank, source token, slot). [E_l + 1]
  const std::vector<int64_t>& recv_offsets() const { return recv_offsets_; }
  // recv_order()[i]: the position in the raw MPI receive buffer (grouped by source rank) of the
  // i-th expert-grouped row.
  const std::vector<int64_t>& recv_order() const { return recv_order_; }
  // kept()[t*k + j]: false for an empty or dropped slot (it contributes zero in combine).
  const std::vector<uint8_t>& kept() const { return kept_; }
  const LoadStats& stats() const { return stats_; }
  // Non-empty (rank, local expert) blocks in expert-grouped order: for e, for source rank.
  const std::vector<RowBlock>& recv_blocks() const { return recv_blocks_; }
  // Non-empty (destination rank, local expert) blocks of the send rows, in send order; they
  // cover send rows [0, n_send()) exactly. dest_row places this rank's rows after those of
  // lower source ranks within the destination's expert group.
  const std::vector<SendBlock>& send_blocks() const { return send_blocks_; }
  // Rows every rank receives (R of each rank), identical on every rank. [P]
  const std::vector<int64_t>& rank_recv_rows() const { return stats_.rank_tokens; }
  // Slots per expert in capacity mode (identical on every rank); 0 in dropless mode.
  int64_t capacity() const { return capacity_; }
  // Global index of this rank's first token: the sum of T over lower ranks.
  int64_t token_offset() const { return token_offset_; }

 private:
  static DispatchPlan build_replicated(const RoutingView& routing, const ExpertPlacement& placement,
                                       const PlanOptions& options, const Communicator& comm);
  int64_t n_tokens_ = 0;
  int k_ = 0;
  std::vector<int64_t> send_slot_, send_counts_, send_displs_, recv_counts_, recv_displs_;
  std::vector<int64_t> recv_offsets_, recv_order_;
  std::vector<uint8_t> kept_;
  std::vector<RowBlock> recv_blocks_;
  std::vector<SendBlock> send_blocks_;
  int64_t capacity_ = 0;
  int64_t token_offset_ = 0;
  LoadStats stats_;
};

}  // namespace moe::comm
