// moe-bench layer: one MoE layer, forward + backward, under mpirun (any rank count).
//   mpirun -np 2 moe-bench layer --threads 1 [--json]     2 ranks x 1 thread
//   mpirun -np 1 moe-bench layer --threads 2 [--json]     1 rank  x 2 threads
//   --exchange auto|alltoallv|shared|hierarchical (comm.exchange; default auto), with
//   --ranks-per-node N (comm.ranks_per_node; default 0 = detect); the path that ran is printed
// Defaults: 4096 tokens over all ranks, d_model 512, d_ff 2048, 8 experts, top-2, GELU,
// dropless (the PyTorch reference's `layer` shape). Figures, each measured in this run:
//   layer_tokens_per_s     global tokens / median step time (max over ranks)
//   expert_ratio_vs_blis   expert GEMM GFLOP/s inside the layer (forward + backward GEMM FLOPs
//                          / ExpertBank time) vs one large BLIS sgemm of the same FLOPs on the
//                          same threads, summed over ranks
//   peak_rss_ratio         peak RSS (getrusage) vs the bytes of weights + grads + activations
//                          the layer must keep, summed over ranks
// The FLOP count is the PyTorch reference's: 2 matrices x 2 d f x tokens x k x 3.
#include <sched.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "comm/communicator.hpp"
#include "comm/placement.hpp"
#include "examples/bench/bench.hpp"
#include "model/layers/moe_layer.hpp"
#include "runtime/gemm.hpp"
#include "runtime/threads.hpp"

namespace moe::bench {
namespace {

// CPU seconds (user + system) this process has used.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;  // Linux: kilobytes
}

void fill_uniform(Tensor& t, uint64_t seed) {
  model::init_uniform(t.view(), 1.0f, seed, 0);
}

int bench_layer(const std::vector<std::string>& argv) {
  Args args(argv);
  comm::Communicator world = comm::Communicator::world();
  const int P = world.size(), rank = world.rank();
  ThreadPolicy policy;
  policy.omp_threads = static_cast<int>(args.get_int("--threads", 0));
  policy.apply();
  const bool json = args.flag("--json");
  // mpirun binds a rank to one core by default for np <= 2: 1 rank x 2 threads then shares one.
  cpu_set_t mask;
  CPU_ZERO(&mask);
  const int bound = sched_getaffinity(0, sizeof mask, &mask) == 0 ? CPU_COUNT(&mask) : 0;
  if (world.any(bound > 0 && bound < policy.omp_threads) && rank == 0)
    std::fprintf(stderr,
                 "warning: a rank may use only %d core(s) for %d threads; run mpirun with "
                 "--bind-to none (or without mpirun for one rank)\n",
                 bound, policy.omp_threads);
  const int64_t tokens = args.get_int("--tokens", 4096);
  const int64_t d = args.get_int("--d-model", 512);
  model::MoeConfig cfg;
  cfg.n_experts = static_cast<int>(args.get_int("--experts", 8));
  cfg.top_k = static_cast<int>(args.get_int("--top-k", 2));
  cfg.d_ff = args.get_int("--d-ff", 2048);
  cfg.activation = model::parse_activation(args.get("--activation", "gelu"));
  cfg.capacity_factor = args.get_float("--capacity-factor", 0.0);
  cfg.pipeline_chunks = static_cast<int>(args.get_int("--chunks", 1));
  cfg.exchange = model::parse_exchange_mode(args.get("--exchange", "auto"));
  cfg.ranks_per_node = int(args.get_int("--ranks-per-node", 0));
  const int samples = static_cast<int>(args.get_int("--samples", 5));
  const double min_time = args.get_float("--min-time", 1.0);

  const double rss_start = peak_rss_bytes();
  comm::ExpertPlacement placement = comm::ExpertPlacement::blocked(cfg.n_experts, P);
  model::MoeLayer layer("moe", d, cfg, placement, world, 1234);
  const int64_t t0 = tokens * rank / P, T = tokens * (rank + 1) / P - t0;
  Tensor x({T, d}), y({T, d}), dy({T, d}), dx({T, d});
  fill_uniform(x, 1000 + static_cast<uint64_t>(rank));
  fill_uniform(dy, 2000 + static_cast<uint64_t>(rank));

  double expert_s = 0.0, exchange_s = 0.0;
  int64_t steps = 0;
  auto step = [&] {
    layer.zero_grad();
    layer.forward(x.view(), y.view());
    layer.backward(dy.view(), dx.view(), 1.0f);
    expert_s += layer.stats().expert_seconds;
    exchange_s += layer.stats().exchange_seconds;
    ++steps;
  };
  // Collective timing: every rank runs the same number of steps (decided from the slowest).
  step();
  world.barrier();
  double t_one = now_s();
  step();
  t_one = world.max(now_s() - t_one);
  const int reps = std::max(1, static_cast<int>(std::ceil(min_time / t_one)));
  std::vector<double> times;
  expert_s = exchange_s = 0.0;
  steps = 0;
  world.barrier();
  const double wall0 = now_s(), cpu0 = cpu_seconds();
  for (int s = 0; s < samples; ++s) {
    world.barrier();
    double ts = now_s();
    for (int r = 0; r < reps; ++r) step();
    times.push_back(world.max(now_s() - ts) / reps);
  }
  // The share of its cores this run got: < 1 means other processes competed for them (MPI's
  // busy-waiting counts as use, so this is an upper bound).
  const double cpu_share =
      world.sum(cpu_seconds() - cpu0) / ((now_s() - wall0) * P * std::max(1, policy.omp_threads));
  std::sort(times.begin(), times.end());
  const double step_s = times[times.size() / 2];
  const double rss_layer = peak_rss_bytes();

  // Expert GEMM rate inside the layer on this rank.
  const int64_t R = layer.plan().n_recv();
  const double expert_flops = layer.experts().flops_fwd_bwd(R);
  const double expert_gflops_rank = expert_flops / (expert_s / double(steps)) / 1e9;

  // One large BLIS sgemm of the same FLOPs, all ranks at once, on this rank's threads.
  const int64_t n = std::max<int64_t>(64, std::llround(std::cbrt(expert_flops / 2.0)));
  double blis_gflops_rank = 0.0;
  {
    Tensor a({n, n}), b({n, n}), c({n, n});
    a.fill(0.5f);
    b.fill(0.25f);
    auto g = [&] { gemm(Trans::kNo, Trans::kNo, 1.0f, a.view(), b.view(), 0.0f, c.view()); };
    g();
    std::vector<double> bt;
    for (int s = 0; s < std::max(3, samples / 2); ++s) {
      world.barrier();
      double ts = now_s();
      g();
      bt.push_back(now_s() - ts);
    }
    std::sort(bt.begin(), bt.end());
    blis_gflops_rank = 2.0 * double(n) * n * n / bt[bt.size() / 2] / 1e9;
  }

  // What the layer must keep: parameters + gradients + the activations backward reads.
  const int E = cfg.n_experts, k = cfg.top_k;
  const int64_t f = cfg.d_ff, f1 = cfg.activation == model::Activation::kSwiglu ? 2 * f : f;
  const int64_t El = layer.experts().n_local();
  double keep = 2.0 * (d * E + El * (d * f1 + f * d));        // weights + grads
  keep += double(T) * d + double(T) * E + double(T) * k * d;  // x, probs, slot_out
  keep += double(R) * (d + f1 + f);                           // xin, h, a
  keep *= sizeof(float);

  const double expert_gflops = world.sum(expert_gflops_rank);
  const double blis_gflops = world.sum(blis_gflops_rank);
  const double rss_total = world.sum(rss_layer), keep_total = world.sum(keep);
  const double rss_base = world.sum(rss_start);
  const double tokens_per_s = double(tokens) / step_s;
  const double torch_flops = 2.0 * 2.0 * d * f * double(tokens) * k * 3.0;
  const auto& load = layer.stats().load;
  const double exch_ms = world.max(exchange_s / double(steps)) * 1e3;
  const double exp_ms = world.max(expert_s / double(steps)) * 1e3;
  const double bytes_sent = world.sum(double(layer.stats().bytes_sent));

  if (rank == 0) {
    std::printf("moe-bench layer: %d rank(s) x %s; BLIS %s\n", P, policy.describe().c_str(),
                blis_version());
    std::printf(
        "tokens %lld, d_model %lld, d_ff %lld, %d experts, top-%d, %s, %s, chunks %d, "
        "exchange %s (asked %s)\n\n",
        (long long)tokens, (long long)d, (long long)f, E, k, model::activation_name(cfg.activation),
        cfg.capacity_factor > 0 ? cat("capacity ", cfg.capacity_factor).c_str() : "dropless",
        cfg.pipeline_chunks, model::exchange_mode_name(layer.exchange()),
        model::exchange_mode_name(cfg.exchange));
    std::printf("%-34s %12.1f ms  [%.1f - %.1f]\n", "step (forward + backward)", step_s * 1e3,
                times.front() * 1e3, times.back() * 1e3);
    std::printf("%-34s %12.0f tokens/s\n", "layer", tokens_per_s);
    std::printf("%-34s %12.1f GFLOP/s (PyTorch's FLOP count)\n", "layer",
                torch_flops / step_s / 1e9);
    std::printf("%-34s %12.1f ms/step (max over ranks)\n", "expert compute", exp_ms);
    std::printf("%-34s %12.1f ms/step (max over ranks), %.1f MB sent/step\n", "exchange", exch_ms,
                bytes_sent / 1e6);
    std::printf("%-34s %12.1f GFLOP/s (sum over ranks)\n", "expert GEMMs", expert_gflops);
    std::printf("%-34s %12.1f GFLOP/s (%lld^3 per rank, sum)\n", "BLIS sgemm, same FLOPs",
                blis_gflops, (long long)n);
    std::printf("%-34s %12.3f\n", "expert_ratio_vs_blis", expert_gflops / blis_gflops);
    std::printf("%-34s %12.1f MB (process start %.1f MB), must keep %.1f MB\n", "peak RSS",
                rss_total / 1e6, rss_base / 1e6, keep_total / 1e6);
    std::printf("%-34s %12.3f\n", "peak_rss_ratio", rss_total / keep_total);
    std::printf("%-34s %12.2f (of %d ranks x %d threads; < 1: other processes competed)\n",
                "cpu share", cpu_share, P, policy.omp_threads);
    std::printf("%-34s %12.3f (experts), %.3f (ranks), drop rate %.4f\n", "imbalance max/mean",
                load.expert_imbalance, load.rank_imbalance, load.drop_rate());
    if (json) {
      nlohmann::json out = {{"bench", "layer"},
                            {"ranks", P},
                            {"threads", policy.omp_threads},
                            {"tokens", tokens},
                            {"d_model", d},
                            {"d_ff", f},
                            {"experts", E},
                            {"top_k", k},
                            {"activation", model::activation_name(cfg.activation)},
                            {"capacity_factor", cfg.capacity_factor},
                            {"pipeline_chunks", cfg.pipeline_chunks},
                            {"exchange", model::exchange_mode_name(layer.exchange())},
                            {"step_ms", step_s * 1e3},
                            {"step_ms_min", times.front() * 1e3},
                            {"step_ms_max", times.back() * 1e3},
                            {"layer_tokens_per_s", tokens_per_s},
                            {"layer_gflops", torch_flops / step_s / 1e9},
                            {"expert_ms", exp_ms},
                            {"exchange_ms", exch_ms},
                            {"expert_gflops", expert_gflops},
                            {"blis_gflops", blis_gflops},
                            {"expert_ratio_vs_blis", expert_gflops / blis_gflops},
                            {"peak_rss_bytes", rss_total},
                            {"must_keep_bytes", keep_total},
                            {"peak_rss_ratio", rss_total / keep_total},
                            {"expert_imbalance", load.expert_imbalance},
                            {"drop_rate", load.drop_rate()},
                            {"cpu_share", cpu_share}};
      std::printf("%s\n", out.dump().c_str());
    }
  }
  return 0;
}

}  // namespace
MOE_BENCH("layer", "MoE layer forward+backward tokens/s, expert GEMMs vs BLIS, peak RSS",
          bench_layer);
}  // namespace moe::bench
