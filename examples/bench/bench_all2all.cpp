// moe-bench all2all: dispatch + combine of an MoE layer's token rows against raw MPI_Alltoallv
// moving the same byte counts, both measured in the same run, the same way.
//
//   mpirun -np 2 moe-bench all2all [--tokens 4096] [--d-model 512] [--experts 8] [--top-k 2]
//                                  [--samples 7] [--min-time 0.2] [--rounds 31]
//                                  [--ranks-per-node 0] [--json]
//
// Routing is random top-k over distinct experts (dropless), seeded per rank. Paths of ours:
// - alltoallv (flat): Exchange::dispatch (token rows -> expert-grouped rows) followed by
//   Exchange::combine (back to slot rows), including the packing and regrouping they do;
// - hierarchical: the same calls with ExchangeAlgorithm::kHierarchical (within the node, then
//   across nodes), on the node layout from MPI or forced by --ranks-per-node N (consecutive
//   blocks of N ranks are one "node", as comm.ranks_per_node); skipped on uneven nodes;
// - shared (when all ranks are on one node and no forced layout splits them):
//   Exchange::dispatch_shared, combine_buffer and combine_shared. The identity "experts"
//   copying the dispatched rows into combine_buffer sit between them and are not timed: they
//   stand for the expert computation, which writes there.
// For flat and hierarchical it also prints the traffic of one dispatch + combine per rank
// (messages and bytes sent to other ranks, and the part that crosses node boundaries, mean and
// max over ranks) from the exchanges' own counters. On one machine "crossing a node boundary"
// is still shared memory, so the times only show the cost of the extra phase and copies; the
// internode counts are what a real cluster's network would carry.
// "Raw" is two MPI_Alltoallv calls on contiguous buffers with exactly the per-rank byte counts of
// the plan (self included), one in each direction: it moves bytes only, while every path of ours
// also gathers the token rows into send order, groups the received rows by expert and scatters
// the returned rows to their slots. So a second reference, "raw + reorder", adds those row
// movements to the same two calls the plain way (one memcpy per row: x -> send order,
// receive order -> expert-grouped, back, and send order -> slots), and every path is reported
// against both: the ratio to raw (bytes only; the target) and to raw + reorder. Samples
// alternate between the paths so background load hits all alike; a sample's time is the slowest
// rank's; the figure is the median sample. exchange_ratio_vs_mpi in the JSON is the best available
// path's ratio. A second, interleaved measurement times single rounds, one of each path in turn, so
// every path starts from the cache state another left (as in a layer, where expert GEMMs run
// between exchanges) instead of repeating itself on a hot cache; the raw reference gains most from
// repetition, its working set being the smallest. Median round, slowest rank.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>

#include "comm/communicator.hpp"
#include "comm/exchange.hpp"
#include "comm/placement.hpp"
#include "comm/plan.hpp"
#include "examples/bench/bench.hpp"
#include "runtime/tensor.hpp"

namespace moe::bench {
namespace {

// Seconds per call of f over `reps` calls, between barriers, as seen by the slowest rank.
// Collective: every rank passes the same reps.
double timed(const comm::Communicator& w, const std::function<void()>& f, int64_t reps) {
  w.barrier("all2all bench: sample");
  const double t0 = MPI_Wtime();
  for (int64_t i = 0; i < reps; ++i) f();
  return w.max(MPI_Wtime() - t0, "all2all bench: sample time") / double(reps);
}

// Seconds per call spent in the timed part of f (f adds it to `part`), over `reps` calls, as seen
// by the slowest rank. Collective.
double timed_part(const comm::Communicator& w, const std::function<void()>& f, double& part,
                  int64_t reps) {
  w.barrier("all2all bench: sample");
  part = 0.0;
  for (int64_t i = 0; i < reps; ++i) f();
  return w.max(part, "all2all bench: sample time") / double(reps);
}

// Repetitions per sample so that one sample lasts about min_time, agreed from rank 0.
int64_t calibrate(const comm::Communicator& w, const std::function<void()>& f, double min_time) {
  f();  // warm-up: buffers sized, MPI connections made
  const double one = timed(w, f, 1);
  int64_t reps = std::max<int64_t>(1, int64_t(min_time / std::max(one, 1e-9)));
  w.broadcast(&reps, 1, 0, "all2all bench: reps");
  return reps;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int bench_all2all(const std::vector<std::string>& argv) {
  Args args(argv);
  const int64_t T = args.get_int("--tokens", 4096), d = args.get_int("--d-model", 512);
  const int E = int(args.get_int("--experts", 8)), k = int(args.get_int("--top-k", 2));
  const int samples = int(args.get_int("--samples", 7));
  const int rounds = int(args.get_int("--rounds", 31));
  const double min_time = args.get_float("--min-time", 0.2);
  const bool json = args.flag("--json");
  const int rpn = int(args.get_int("--ranks-per-node", 0));
  if (k < 1 || k > E) throw Error(ErrorKind::kConfig, cat("all2all bench: top-k ", k, " of ", E));

  comm::Communicator w = comm::Communicator::world();
  const int P = w.size(), me = w.rank();
  comm::ExpertPlacement placement = comm::ExpertPlacement::blocked(E, P);

  // Random top-k routing over distinct experts.
  std::vector<int32_t> expert(size_t(T * k));
  std::vector<float> weight(size_t(T * k));
  std::mt19937_64 rng(1234 + me);
  std::vector<int32_t> ids(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) ids[e] = e;
    for (int j = 0; j < k; ++j) {
      std::swap(ids[j], ids[j + rng() % (E - j)]);
      expert[t * k + j] = ids[j];
      weight[t * k + j] = 1.0f / k;
    }
  }
  const comm::RoutingView routing{T, k, expert.data(), weight.data()};
  const double tp0 = MPI_Wtime();
  comm::DispatchPlan plan = comm::DispatchPlan::build(routing, placement, {}, w);
  const double plan_s = w.max(MPI_Wtime() - tp0);
  const int64_t R = plan.n_recv();

  Tensor x({std::max<int64_t>(T, 1), d}), expert_in({std::max<int64_t>(R, 1), d}),
      slot_out({std::max<int64_t>(T * k, 1), d});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c) x[t * d + c] = float(t % 1000) + float(c) / 1024;
  comm::Exchange ex(w, "bench", {comm::ExchangeAlgorithm::kFlat, rpn});
  comm::Exchange hx(w, "bench.hier", {comm::ExchangeAlgorithm::kHierarchical, rpn});
  const comm::NodeLayout& nodes = ex.nodes();  // the flat exchange then counts internode traffic
  const bool hier = nodes.uniform();
  auto through = [&](comm::Exchange& e) {
    e.dispatch(plan, ConstView(x.data(), T, d), View(expert_in.data(), R, d));
    e.combine(plan, ConstView(expert_in.data(), R, d), View(slot_out.data(), T * k, d));
  };
  auto ours = [&] { through(ex); };
  auto ours_hier = [&] { through(hx); };

  // The node-local path: one copy each way through shared windows; only the exchange is timed.
  const bool shared = ex.shared_available();
  double shared_part = 0.0;
  auto ours_shared = [&] {
    double t0 = MPI_Wtime();
    ConstView in = ex.dispatch_shared(plan, ConstView(x.data(), T, d));
    View y = ex.combine_buffer(plan, d);
    shared_part += MPI_Wtime() - t0;
    if (R > 0) std::memcpy(y.data, in.data, sizeof(float) * size_t(R * d));  // identity experts
    t0 = MPI_Wtime();
    ex.combine_shared(plan, View(slot_out.data(), T * k, d));
    shared_part += MPI_Wtime() - t0;
  };

  // Check once per path that the rows came home, so the figures are for a correct exchange.
  // The traffic figures come from the first (checked) call of flat and hierarchical.
  const char* names[] = {"alltoallv", "shared", "hierarchical"};
  comm::ExchangeStats traffic[3];
  for (int path = 0; path < 3; ++path) {
    if ((path == 1 && !shared) || (path == 2 && !hier)) continue;
    comm::Exchange& e = path == 2 ? hx : ex;
    const comm::ExchangeStats before = e.stats();
    slot_out.fill(-1.0f);
    if (path == 1) {
      ours_shared();
    } else {
      through(e);
    }
    const comm::ExchangeStats& after = e.stats();
    traffic[path].bytes_sent = after.bytes_sent - before.bytes_sent;
    traffic[path].messages_sent = after.messages_sent - before.messages_sent;
    traffic[path].internode_bytes_sent = after.internode_bytes_sent - before.internode_bytes_sent;
    traffic[path].internode_messages_sent =
        after.internode_messages_sent - before.internode_messages_sent;
    int64_t wrong = 0;
    for (int64_t s = 0; s < T * k; ++s)
      wrong += std::memcmp(slot_out.data() + s * d, x.data() + (s / k) * d, sizeof(float) * d) != 0;
    if (w.any(wrong > 0))
      throw Error(ErrorKind::kInternal, cat("all2all bench: ", wrong, " slot rows did not return (",
                                            names[path], " path)"));
  }
  // Per rank and dispatch + combine: {mean, max} over ranks of each traffic figure.
  auto mean_max = [&](int64_t v) {
    return std::pair<double, int64_t>(double(w.sum(v)) / P, w.max(v));
  };
  std::pair<double, int64_t> msgs[3], xmsgs[3], bytes[3], xbytes[3];
  for (int path : {0, 2}) {
    msgs[path] = mean_max(traffic[path].messages_sent);
    xmsgs[path] = mean_max(traffic[path].internode_messages_sent);
    bytes[path] = mean_max(traffic[path].bytes_sent);
    xbytes[path] = mean_max(traffic[path].internode_bytes_sent);
  }

  // Raw MPI_Alltoallv with the plan's byte counts (self included), there and back.
  std::vector<int> sc(P), sd(P), rc(P), rd(P);
  for (int q = 0; q < P; ++q) {
    sc[q] = int(plan.send_counts()[q] * d);
    sd[q] = int(plan.send_displs()[q] * d);
    rc[q] = int(plan.recv_counts()[q] * d);
    rd[q] = int(plan.recv_displs()[q] * d);
  }
  Tensor raw_send({std::max<int64_t>(plan.n_send(), 1), d}), raw_recv({std::max<int64_t>(R, 1), d});
  raw_send.fill(1.0f);
  raw_recv.fill(0.0f);
  auto raw = [&] {
    MOE_MPI_CHECK(MPI_Alltoallv(raw_send.data(), sc.data(), sd.data(), MPI_FLOAT, raw_recv.data(),
                                rc.data(), rd.data(), MPI_FLOAT, w.raw()),
                  "all2all bench: raw dispatch");
    MOE_MPI_CHECK(MPI_Alltoallv(raw_recv.data(), rc.data(), rd.data(), MPI_FLOAT, raw_send.data(),
                                sc.data(), sd.data(), MPI_FLOAT, w.raw()),
                  "all2all bench: raw combine");
  };
  // The same two calls with the row reordering a dispatch + combine needs, one memcpy per row.
  const std::vector<int64_t>& slot = plan.send_slot();
  const std::vector<int64_t>& order = plan.recv_order();
  const size_t row_bytes = sizeof(float) * size_t(d);
  auto raw_reorder = [&] {
    for (int64_t i = 0; i < plan.n_send(); ++i)
      std::memcpy(raw_send.data() + i * d, x.data() + (slot[i] / k) * d, row_bytes);
    MOE_MPI_CHECK(MPI_Alltoallv(raw_send.data(), sc.data(), sd.data(), MPI_FLOAT, raw_recv.data(),
                                rc.data(), rd.data(), MPI_FLOAT, w.raw()),
                  "all2all bench: raw dispatch");
    for (int64_t i = 0; i < R; ++i)
      std::memcpy(expert_in.data() + i * d, raw_recv.data() + order[i] * d, row_bytes);
    for (int64_t i = 0; i < R; ++i)
      std::memcpy(raw_recv.data() + order[i] * d, expert_in.data() + i * d, row_bytes);
    MOE_MPI_CHECK(MPI_Alltoallv(raw_recv.data(), rc.data(), rd.data(), MPI_FLOAT, raw_send.data(),
                                sc.data(), sd.data(), MPI_FLOAT, w.raw()),
                  "all2all bench: raw combine");
    for (int64_t i = 0; i < plan.n_send(); ++i)
      std::memcpy(slot_out.data() + slot[i] * d, raw_send.data() + i * d, row_bytes);
  };

  const int64_t reps_ours = calibrate(w, ours, min_time);
  const int64_t reps_shared = shared ? calibrate(w, ours_shared, min_time) : 0;
  const int64_t reps_hier = hier ? calibrate(w, ours_hier, min_time) : 0;
  const int64_t reps_raw = calibrate(w, raw, min_time);
  const int64_t reps_reorder = calibrate(w, raw_reorder, min_time);
  std::vector<double> t_ours, t_shared, t_hier, t_raw, t_reorder;
  for (int s = 0; s < samples; ++s) {
    t_ours.push_back(timed(w, ours, reps_ours));
    if (shared) t_shared.push_back(timed_part(w, ours_shared, shared_part, reps_shared));
    if (hier) t_hier.push_back(timed(w, ours_hier, reps_hier));
    t_raw.push_back(timed(w, raw, reps_raw));
    t_reorder.push_back(timed(w, raw_reorder, reps_reorder));
  }
  const double s_ours = median(t_ours), s_raw = median(t_raw), s_reorder = median(t_reorder);
  const double s_shared = shared ? median(t_shared) : 0.0;
  const double s_hier = hier ? median(t_hier) : 0.0;

  std::vector<double> i_ours, i_shared, i_hier, i_raw, i_reorder;
  for (int r = 0; r < rounds; ++r) {
    i_ours.push_back(timed(w, ours, 1));
    if (shared) i_shared.push_back(timed_part(w, ours_shared, shared_part, 1));
    if (hier) i_hier.push_back(timed(w, ours_hier, 1));
    i_raw.push_back(timed(w, raw, 1));
    i_reorder.push_back(timed(w, raw_reorder, 1));
  }
  const double si_ours = median(i_ours), si_raw = median(i_raw), si_reorder = median(i_reorder);
  const double si_shared = shared ? median(i_shared) : 0.0;
  const double si_hier = hier ? median(i_hier) : 0.0;
  const double iratio = si_raw / si_ours, iratio_shared = shared ? si_raw / si_shared : 0.0;
  const double iratio_hier = hier ? si_raw / si_hier : 0.0;

  // Bytes per iteration: every kept slot's row goes out and comes back (self included).
  const int64_t bytes_rank = 2 * plan.n_send() * d * int64_t(sizeof(float));
  const int64_t bytes_total = w.sum(bytes_rank);
  int64_t remote_rows = plan.n_send() - plan.send_counts()[me];
  const int64_t bytes_remote = w.sum(2 * remote_rows * d * int64_t(sizeof(float)));
  const double ratio = s_raw / s_ours;
  const double ratio_shared = shared ? s_raw / s_shared : 0.0;
  const double ratio_hier = hier ? s_raw / s_hier : 0.0;
  const double best_ratio = std::max({ratio, ratio_shared, ratio_hier});
  const char* best_path = best_ratio == ratio          ? "alltoallv"
                          : best_ratio == ratio_shared ? "shared"
                                                       : "hierarchical";
  const double s_best = s_raw / best_ratio;
  const comm::LoadStats& st = plan.stats();

  if (me == 0) {
    std::printf("all2all: P=%d ranks, T=%lld tokens/rank, d=%lld, E=%d, top-%d random, dropless\n",
                P, (long long)T, (long long)d, E, k);
    std::printf("nodes: %s%s\n", nodes.describe().c_str(),
                nodes.forced ? " -- forced on one machine: 'internode' traffic is still shared "
                               "memory here"
                             : "");
    std::printf(
        "bytes per dispatch+combine: %.1f MB total (%.1f MB between ranks); plan build "
        "%.3f ms; expert imbalance %.3f\n\n",
        bytes_total / 1e6, bytes_remote / 1e6, plan_s * 1e3, st.expert_imbalance);
    std::printf("%-40s %10s %10s %8s %8s\n", "", "ms", "GB/s", "vs raw", "vs raw+r");
    // One table row: time, throughput, ratio to raw (bytes only) and to raw + reorder.
    auto row = [&](const char* name, double sec, double ref, double ref_reorder) {
      std::printf("%-40s %10.3f %10.2f %8.3f %8.3f\n", name, sec * 1e3, bytes_total / sec / 1e9,
                  ref / sec, ref_reorder / sec);
    };
    auto absent = [](const char* name) {
      std::printf("%-40s %10s %10s %8s %8s\n", name, "-", "-", "-", "-");
    };
    row("ours, alltoallv: dispatch + combine", s_ours, s_raw, s_reorder);
    if (shared) {
      row("ours, shared: dispatch/combine_shared", s_shared, s_raw, s_reorder);
    } else {
      absent("ours, shared (ranks span nodes)");
    }
    if (hier) {
      row("ours, hierarchical: dispatch + combine", s_hier, s_raw, s_reorder);
    } else {
      absent("ours, hierarchical (uneven nodes)");
    }
    row("raw MPI_Alltoallv x2 (same bytes)", s_raw, s_raw, s_reorder);
    row("raw + reorder (memcpy per row)", s_reorder, s_raw, s_reorder);
    std::printf("\ninterleaved single rounds (%d, median):\n", rounds);
    row("ours, alltoallv", si_ours, si_raw, si_reorder);
    if (shared) row("ours, shared", si_shared, si_raw, si_reorder);
    if (hier) row("ours, hierarchical", si_hier, si_raw, si_reorder);
    row("raw MPI_Alltoallv x2", si_raw, si_raw, si_reorder);
    row("raw + reorder", si_reorder, si_raw, si_reorder);
    std::printf(
        "\nraw moves the bytes only (contiguous buffers); ours also gathers token rows into send\n"
        "order, groups received rows by expert and scatters returned rows to slots (shared: in\n"
        "the same single copy). raw+r adds those row movements to raw, one memcpy per row.\n");
    std::printf("\ntraffic per rank, one dispatch + combine (mean / max over ranks):\n");
    std::printf("%-14s %17s %17s %19s %19s\n", "", "messages", "internode msgs", "MB sent",
                "internode MB");
    for (int path : {0, 2}) {
      if (path == 2 && !hier) continue;
      std::printf("%-14s %8.1f /%7lld %8.1f /%7lld %9.3f /%8.3f %9.3f /%8.3f\n", names[path],
                  msgs[path].first, (long long)msgs[path].second, xmsgs[path].first,
                  (long long)xmsgs[path].second, bytes[path].first / 1e6, bytes[path].second / 1e6,
                  xbytes[path].first / 1e6, xbytes[path].second / 1e6);
    }
    if (json) {
      nlohmann::json out = {
          {"bench", "all2all"},
          {"ranks", P},
          {"tokens_per_rank", T},
          {"d_model", d},
          {"experts", E},
          {"top_k", k},
          {"bytes", bytes_total},
          {"bytes_between_ranks", bytes_remote},
          {"exchange_path", best_path},
          {"nodes", nodes.n_nodes},
          {"ranks_per_node", nodes.ranks_per_node},
          {"nodes_forced", nodes.forced},
          {"seconds", s_best},
          {"seconds_alltoallv", s_ours},
          {"seconds_shared", shared ? nlohmann::json(s_shared) : nullptr},
          {"seconds_hierarchical", hier ? nlohmann::json(s_hier) : nullptr},
          {"seconds_mpi", s_raw},
          {"throughput_gbs", bytes_total / s_best / 1e9},
          {"throughput_mpi_gbs", bytes_total / s_raw / 1e9},
          {"plan_seconds", plan_s},
          {"samples", samples},
          {"exchange_ratio_vs_mpi", best_ratio},
          {"exchange_ratio_vs_mpi_alltoallv", ratio},
          {"exchange_ratio_vs_mpi_shared", shared ? nlohmann::json(ratio_shared) : nullptr},
          {"exchange_ratio_vs_mpi_hierarchical", hier ? nlohmann::json(ratio_hier) : nullptr},
          {"rounds", rounds},
          {"seconds_mpi_interleaved", si_raw},
          {"exchange_ratio_vs_mpi_interleaved", std::max({iratio, iratio_shared, iratio_hier})},
          {"exchange_ratio_vs_mpi_alltoallv_interleaved", iratio},
          {"exchange_ratio_vs_mpi_shared_interleaved",
           shared ? nlohmann::json(iratio_shared) : nullptr},
          {"exchange_ratio_vs_mpi_hierarchical_interleaved",
           hier ? nlohmann::json(iratio_hier) : nullptr},
          // Against raw + the row reordering done one memcpy per row (see the top of the file).
          {"seconds_mpi_reorder", s_reorder},
          {"seconds_mpi_reorder_interleaved", si_reorder},
          {"exchange_ratio_vs_mpi_reorder", s_reorder / s_best},
          {"exchange_ratio_vs_mpi_reorder_interleaved",
           si_reorder /
               std::min({si_ours, shared ? si_shared : si_ours, hier ? si_hier : si_ours})},
          {"mpi_reference",
           "MPI_Alltoallv x2 on contiguous buffers, same per-rank bytes; "
           "no row gather/scatter"}};
      // Traffic per rank and dispatch + combine, mean and max over ranks, per algorithm.
      for (int path : {0, 2}) {
        if (path == 2 && !hier) continue;
        out["traffic"][names[path]] = {{"messages_mean", msgs[path].first},
                                       {"messages_max", msgs[path].second},
                                       {"internode_messages_mean", xmsgs[path].first},
                                       {"internode_messages_max", xmsgs[path].second},
                                       {"bytes_sent_mean", bytes[path].first},
                                       {"bytes_sent_max", bytes[path].second},
                                       {"internode_bytes_mean", xbytes[path].first},
                                       {"internode_bytes_max", xbytes[path].second}};
      }
      std::printf("%s\n", out.dump().c_str());
    }
  }
  return 0;
}

}  // namespace
MOE_BENCH("all2all", "dispatch+combine throughput vs raw MPI_Alltoallv on the same bytes",
          bench_all2all);
}  // namespace moe::bench
