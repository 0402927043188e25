#include "comm/plan.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "runtime/error.hpp"

namespace moe::comm {

namespace {

// One candidate slot as its owner sees it in capacity mode: enough to rank it globally.
struct SlotMeta {
  float weight;
  int32_t local_expert;
  int64_t global_slot;  // global token index * k + slot: the tie-break, rank-count independent
};
static_assert(sizeof(SlotMeta) == 16, "SlotMeta travels as 16 raw bytes");

// A committed MPI datatype freed on scope exit.
class ScopedType {
 public:
  ScopedType(int bytes, const char* what) {
    MOE_MPI_CHECK(MPI_Type_contiguous(bytes, MPI_BYTE, &type_), what);
    MOE_MPI_CHECK(MPI_Type_commit(&type_), what);
  }
  ~ScopedType() { MPI_Type_free(&type_); }
  ScopedType(const ScopedType&) = delete;
  ScopedType& operator=(const ScopedType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// int copies of int64 counts for MPI; throws Error(kComm) naming `what` if one does not fit.
void to_int(const std::vector<int64_t>& in, std::vector<int>& out, const char* what) {
  out.resize(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] > kMaxMpiCount)
      throw Error(ErrorKind::kComm, cat(what, ": count or displacement ", in[i],
                                        " exceeds the MPI int limit ", kMaxMpiCount));
    out[i] = static_cast<int>(in[i]);
  }
}

void prefix(const std::vector<int64_t>& counts, std::vector<int64_t>& displs) {
  displs.assign(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) displs[i] = displs[i - 1] + counts[i - 1];
}

// Alltoallv of `type` elements with int64 counts (elements of `type`). Collective.
void alltoallv(const void* send, const std::vector<int64_t>& scounts, void* recv,
               const std::vector<int64_t>& rcounts, MPI_Datatype type, const Communicator& comm,
               const char* what) {
  std::vector<int64_t> sdispl, rdispl;
  prefix(scounts, sdispl);
  prefix(rcounts, rdispl);
  std::vector<int> sc, sd, rc, rd;
  to_int(scounts, sc, what);
  to_int(sdispl, sd, what);
  to_int(rcounts, rc, what);
  to_int(rdispl, rd, what);
  MOE_MPI_CHECK(
      MPI_Alltoallv(send, sc.data(), sd.data(), type, recv, rc.data(), rd.data(), type, comm.raw()),
      what);
}

// Most int64 counts the dropless plan all-gathers (P x (P E_l + 2)); beyond it, a scan and an
// all-to-all of counts scale better.
constexpr int64_t kMaxGatheredCounts = 16384;

double max_over_mean(const std::vector<int64_t>& v) {
  if (v.empty()) return 0.0;
  const int64_t total = std::accumulate(v.begin(), v.end(), int64_t{0});
  if (total == 0) return 0.0;  // nothing routed: no imbalance to report
  const int64_t mx = *std::max_element(v.begin(), v.end());
  return double(mx) * double(v.size()) / double(total);
}

}  // namespace

DispatchPlan DispatchPlan::build(const RoutingView& routing, const ExpertPlacement& placement,
                                 const PlanOptions& options, const Communicator& comm) {
  const int P = comm.size(), me = comm.rank();
  const int E = placement.n_experts();
  if (placement.n_ranks() != P)
    throw Error(ErrorKind::kConfig, cat("dispatch plan: placement is for ", placement.n_ranks(),
                                        " ranks, communicator has ", P));
  if (placement.has_replicas()) return build_replicated(routing, placement, options, comm);
  const int64_t T = routing.n_tokens;
  const int k = routing.k;
  const int64_t S = T * k;

  // Validate locally, agree globally, so a bad routing fails on every rank alike.
  std::string bad;
  if (T < 0 || k < 0 || (S > 0 && (!routing.expert || !routing.weight)))
    bad = cat("dispatch plan: bad routing view (T = ", T, ", k = ", k, ")");
  for (int64_t s = 0; bad.empty() && s < S; ++s)
    if (routing.expert[s] < -1 || routing.expert[s] >= E)
      bad = cat("dispatch plan: token ", s / k, " slot ", s % k, " routes to expert ",
                routing.expert[s], ", outside [-1, ", E, ")");
  int max_local = 0;
  for (int r = 0; r < P; ++r) max_local = std::max(max_local, placement.n_local(r));
  // Dropless with a small count matrix: one all-gather of every rank's [P][E_l] send counts
  // (plus its routed and bad-slot counts) gives what the scan, the count exchange, the load
  // statistics and the validation agreement would each need: one collective instead of four,
  // which is what a small decode step pays for (the integers are the same either way).
  const int64_t row = int64_t(P) * max_local + 2;  // [P][max_local] | slots routed | bad
  const bool gather = options.capacity_factor <= 0.0 && int64_t(P) * row <= kMaxGatheredCounts;
  if (!gather) comm.agree(bad, ErrorKind::kInternal, "dispatch plan: validate routing");
  // A bad slot (only possible when gathering) is left out here and reported after the gather.
  auto routed = [&](int64_t s) { return routing.expert[s] >= 0 && routing.expert[s] < E; };

  DispatchPlan plan;
  plan.n_tokens_ = T;
  plan.k_ = k;

  // Experts in (owner rank, local slot) order: ordinal[e], and each rank's first ordinal.
  std::vector<int64_t> rank_first(static_cast<size_t>(P) + 1, 0);
  for (int r = 0; r < P; ++r) rank_first[r + 1] = rank_first[r] + placement.n_local(r);
  std::vector<int> ordinal(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) ordinal[e] = int(rank_first[placement.owner(e)]) + placement.slot(e);

  // Counting sort of the non-empty slots by ordinal; stable, so (token, slot) order within.
  std::vector<int64_t> bucket(static_cast<size_t>(E) + 1, 0);
  for (int64_t s = 0; s < S && bad.empty(); ++s)
    if (routed(s)) ++bucket[ordinal[routing.expert[s]] + 1];
  for (int o = 0; o < E; ++o) bucket[o + 1] += bucket[o];
  const int64_t n_cand = bucket[E];
  std::vector<int64_t> cand(static_cast<size_t>(n_cand));
  {
    std::vector<int64_t> fill(bucket.begin(), bucket.end() - 1);
    for (int64_t s = 0; s < S && bad.empty(); ++s)
      if (routed(s)) cand[fill[ordinal[routing.expert[s]]]++] = s;
  }
  std::vector<int64_t> cand_per_rank(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r) cand_per_rank[r] = bucket[rank_first[r + 1]] - bucket[rank_first[r]];

  // Capacity mode: every owner ranks all candidate slots of its experts over the global batch.
  std::vector<uint8_t> cand_kept(static_cast<size_t>(n_cand), 1);
  if (options.capacity_factor > 0.0) {
    std::vector<int64_t> all_T = comm.allgather<int64_t>(T, "dispatch plan: gather T");
    int64_t T_global = 0;
    for (int r = 0; r < P; ++r) {
      if (r == me) plan.token_offset_ = T_global;
      T_global += all_T[r];
    }
    plan.capacity_ = static_cast<int64_t>(
        std::ceil(options.capacity_factor * double(k) * double(T_global) / double(E)));

    std::vector<SlotMeta> meta(static_cast<size_t>(n_cand));
    for (int64_t i = 0; i < n_cand; ++i) {
      const int64_t s = cand[i];
      meta[i] = {routing.weight[s], placement.slot(routing.expert[s]),
                 (plan.token_offset_ + s / k) * k + s % k};
    }
    std::vector<int64_t> meta_recv_counts(static_cast<size_t>(P));
    MOE_MPI_CHECK(MPI_Alltoall(cand_per_rank.data(), 1, MPI_INT64_T, meta_recv_counts.data(), 1,
                               MPI_INT64_T, comm.raw()),
                  "dispatch plan: capacity counts");
    const int64_t n_meta =
        std::accumulate(meta_recv_counts.begin(), meta_recv_counts.end(), int64_t{0});
    std::vector<SlotMeta> owned(static_cast<size_t>(n_meta));
    ScopedType meta_type(sizeof(SlotMeta), "dispatch plan: slot metadata type");
    alltoallv(meta.data(), cand_per_rank, owned.data(), meta_recv_counts, meta_type.get(), comm,
              "dispatch plan: capacity metadata");

    // Rank by (local expert, weight descending, global slot ascending); keep the first
    // `capacity` of each expert. NaN weights rank last.
    std::vector<int64_t> idx(static_cast<size_t>(n_meta));
    std::iota(idx.begin(), idx.end(), int64_t{0});
    auto key_w = [](float w) { return std::isnan(w) ? -INFINITY : w; };
    std::sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
      const SlotMeta &x = owned[a], &y = owned[b];
      if (x.local_expert != y.local_expert) return x.local_expert < y.local_expert;
      const float wx = key_w(x.weight), wy = key_w(y.weight);
      if (wx != wy) return wx > wy;
      return x.global_slot < y.global_slot;
    });
    std::vector<uint8_t> keep(static_cast<size_t>(n_meta), 0);
    for (int64_t i = 0, rank_in_expert = 0; i < n_meta; ++i) {
      if (i > 0 && owned[idx[i]].local_expert != owned[idx[i - 1]].local_expert) rank_in_expert = 0;
      keep[idx[i]] = rank_in_expert++ < plan.capacity_ ? 1 : 0;
    }
    alltoallv(keep.data(), meta_recv_counts, cand_kept.data(), cand_per_rank, MPI_UINT8_T, comm,
              "dispatch plan: capacity keep mask");
  }

  // Kept slots, per (destination rank, local expert) counts, and the kept mask per slot.
  plan.kept_.assign(static_cast<size_t>(S), 0);
  plan.send_slot_.reserve(static_cast<size_t>(n_cand));
  std::vector<int64_t> send_cnt(static_cast<size_t>(P) * max_local, 0);  // [P][max_local]
  std::vector<int64_t> expert_kept(static_cast<size_t>(E) + 2, 0);       // [E] + slots, dropped
  for (int64_t i = 0; i < n_cand; ++i) {
    const int64_t s = cand[i];
    const int e = routing.expert[s];
    if (!cand_kept[i]) continue;
    plan.kept_[s] = 1;
    plan.send_slot_.push_back(s);
    ++send_cnt[size_t(placement.owner(e)) * max_local + placement.slot(e)];
    ++expert_kept[e];
  }
  expert_kept[E] = n_cand;
  expert_kept[E + 1] = n_cand - plan.n_send();

  // Rows lower ranks send to each (rank, local expert): where this rank's rows start within
  // that expert's group at the destination (the layout is ordered by source rank): from the
  // gathered [P][P][E_l] count matrix when it is small, else one small scan.
  std::vector<int64_t> lower_cnt(send_cnt.size(), 0);  // [P][max_local]
  std::vector<int64_t> recv_cnt(send_cnt.size(), 0);   // [P][max_local]: source q, my expert e
  if (gather) {
    std::vector<int64_t> mine(send_cnt.begin(), send_cnt.end());
    mine.push_back(n_cand);
    mine.push_back(bad.empty() ? 0 : 1);
    std::vector<int64_t> all(static_cast<size_t>(P * row));  // [P][row]
    MOE_MPI_CHECK(MPI_Allgather(mine.data(), int(row), MPI_INT64_T, all.data(), int(row),
                                MPI_INT64_T, comm.raw()),
                  "dispatch plan: gather counts");
    bool any_bad = false;
    for (int q = 0; q < P; ++q) any_bad |= all[size_t(q * row + row - 1)] != 0;
    if (any_bad) comm.agree(bad, ErrorKind::kInternal, "dispatch plan: validate routing");
    std::fill(expert_kept.begin(), expert_kept.end(), 0);
    for (int q = 0; q < P; ++q) {
      const int64_t* g = all.data() + q * row;
      for (size_t i = 0; i < send_cnt.size(); ++i) {
        if (q < me) lower_cnt[i] += g[i];
      }
      for (int e = 0; e < max_local; ++e)
        recv_cnt[size_t(q) * max_local + e] = g[me * max_local + e];
      for (int e = 0; e < E; ++e)
        expert_kept[e] += g[size_t(placement.owner(e)) * max_local + placement.slot(e)];
      expert_kept[E] += g[row - 2];  // dropless: nothing dropped (expert_kept[E + 1] stays 0)
    }
  } else {
    MOE_MPI_CHECK(MPI_Exscan(send_cnt.data(), lower_cnt.data(), int(send_cnt.size()), MPI_INT64_T,
                             MPI_SUM, comm.raw()),
                  "dispatch plan: scan counts");
    if (me == 0) std::fill(lower_cnt.begin(), lower_cnt.end(), 0);  // undefined on rank 0
    MOE_MPI_CHECK(MPI_Alltoall(send_cnt.data(), max_local, MPI_INT64_T, recv_cnt.data(), max_local,
                               MPI_INT64_T, comm.raw()),
                  "dispatch plan: exchange counts");
  }

  plan.send_counts_.assign(static_cast<size_t>(P), 0);
  plan.recv_counts_.assign(static_cast<size_t>(P), 0);
  for (int q = 0; q < P; ++q)
    for (int e = 0; e < max_local; ++e) {
      plan.send_counts_[q] += send_cnt[size_t(q) * max_local + e];
      plan.recv_counts_[q] += recv_cnt[size_t(q) * max_local + e];
    }
  prefix(plan.send_counts_, plan.send_displs_);
  prefix(plan.recv_counts_, plan.recv_displs_);

  // Regroup: expert-grouped order is (local expert, source rank, token, slot).
  const int n_local = placement.n_local(me);
  plan.recv_offsets_.assign(static_cast<size_t>(n_local) + 1, 0);
  int64_t n_recv = 0;
  for (int e = 0; e < n_local; ++e) {
    for (int q = 0; q < P; ++q) {
      const int64_t n = recv_cnt[size_t(q) * max_local + e];
      if (n == 0) continue;
      int64_t raw = plan.recv_displs_[q];
      for (int e2 = 0; e2 < e; ++e2) raw += recv_cnt[size_t(q) * max_local + e2];
      plan.recv_blocks_.push_back({n_recv, raw, n, q});
      n_recv += n;
    }
    plan.recv_offsets_[e + 1] = n_recv;
  }
  plan.recv_order_.resize(static_cast<size_t>(n_recv));
  for (const RowBlock& b : plan.recv_blocks_)
    for (int64_t i = 0; i < b.rows; ++i) plan.recv_order_[b.grouped + i] = b.raw + i;

  // Global load statistics: one all-reduce of [E] kept counts + slots routed + slots dropped.
  if (!gather)
    comm.allreduce_sum(expert_kept.data(), int64_t(expert_kept.size()),
                       "dispatch plan: load stats");
  LoadStats& st = plan.stats_;
  st.expert_tokens.assign(expert_kept.begin(), expert_kept.begin() + E);
  st.rank_tokens.assign(static_cast<size_t>(P), 0);
  for (int e = 0; e < E; ++e) st.rank_tokens[placement.owner(e)] += st.expert_tokens[e];
  st.slots_total = expert_kept[E];
  st.slots_dropped = expert_kept[E + 1];
  // Send blocks: destination row = the global rows of the destination's earlier experts plus
  // the rows of lower source ranks for this expert.
  for (int r = 0; r < P; ++r) {
    int64_t expert_base = 0, send_row = plan.send_displs_[r];
    for (int e = 0; e < placement.n_local(r); ++e) {
      const int64_t n = send_cnt[size_t(r) * max_local + e];
      if (n > 0) {
        plan.send_blocks_.push_back(
            {send_row, expert_base + lower_cnt[size_t(r) * max_local + e], n, r});
      }
      send_row += n;
      expert_base += st.expert_tokens[placement.local_experts(r)[e]];
    }
  }
  st.expert_imbalance = max_over_mean(st.expert_tokens);
  st.rank_imbalance = max_over_mean(st.rank_tokens);
  return plan;
}

// Replicas: every expert instance becomes an expert of its own ("instance" ids in (rank, slot)
// order, so the instance placement has the same local slots), each slot is sent to one instance
// of its expert, and the statistics are summed back per expert. On this rank, the i-th slot (in
// (token, slot) order) routed to expert e goes to instance (i + rank) mod n_instances(e): an
// equal share per instance, decided from the slot order alone, so forward and backward agree.
DispatchPlan DispatchPlan::build_replicated(const RoutingView& routing,
                                            const ExpertPlacement& placement,
                                            const PlanOptions& options, const Communicator& comm) {
  const int P = comm.size(), me = comm.rank();
  const int E = placement.n_experts();
  if (options.capacity_factor > 0.0)
    throw Error(ErrorKind::kConfig,
                "dispatch plan: expert replicas need dropless routing (model.moe.capacity_factor "
                "0); set comm.rebalance.replicas to 0 or drop the capacity factor");
  std::vector<int> rank_first(static_cast<size_t>(P) + 1, 0);
  for (int r = 0; r < P; ++r) rank_first[r + 1] = rank_first[r] + placement.n_local(r);
  const int n_inst = rank_first[P];
  std::vector<int> inst_owner(static_cast<size_t>(n_inst));
  for (int r = 0; r < P; ++r)
    for (int i = rank_first[r]; i < rank_first[r + 1]; ++i) inst_owner[i] = r;
  const ExpertPlacement instances = ExpertPlacement::from_owners(inst_owner, P);

  const int64_t S = routing.n_tokens * routing.k;
  std::vector<int32_t> inst(static_cast<size_t>(std::max<int64_t>(S, 0)));
  std::vector<int64_t> seen(static_cast<size_t>(E), 0);
  for (int64_t s = 0; s < S; ++s) {
    const int32_t e = routing.expert[s];
    if (e < 0 || e >= E) {  // empty (-1) stays empty; out of range stays out of range (reported)
      inst[s] = e < 0 ? e : n_inst + e;
      continue;
    }
    const std::vector<int>& rs = placement.instances(e);
    const size_t i = static_cast<size_t>((seen[e]++ + me) % static_cast<int64_t>(rs.size()));
    inst[s] = rank_first[rs[i]] + placement.slot_on(e, rs[i]);
  }
  RoutingView rv = routing;
  rv.expert = inst.data();
  DispatchPlan plan = build(rv, instances, options, comm);
  LoadStats& st = plan.stats_;
  std::vector<int64_t> per_expert(static_cast<size_t>(E), 0);
  for (int r = 0; r < P; ++r)
    for (int sl = 0; sl < placement.n_local(r); ++sl)
      per_expert[placement.local_experts(r)[sl]] += st.expert_tokens[rank_first[r] + sl];
  st.expert_tokens = std::move(per_expert);
  st.expert_imbalance = max_over_mean(st.expert_tokens);
  return plan;
}

}  // namespace moe::comm
