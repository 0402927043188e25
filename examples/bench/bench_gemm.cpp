// moe-bench gemm: BLIS sgemm on the MoE expert shapes and on 2048^3, against this CPU's fp32
// peak measured in the same run.
#include <cstdio>

#include "examples/bench/bench.hpp"
#include "runtime/gemm.hpp"
#include "runtime/threads.hpp"

namespace moe::bench {
namespace {

int bench_gemm(const std::vector<std::string>& argv) {
  Args args(argv);
  ThreadPolicy policy;
  policy.omp_threads = static_cast<int>(args.get_int("--threads", 0));
  policy.apply();
  const int64_t d = args.get_int("--d-model", 512), f = args.get_int("--d-ff", 2048);
  std::vector<int64_t> tokens = args.get_ints("--tokens", {256, 1024, 4096});
  const bool json = args.flag("--json");

  nlohmann::json peak = cpu_peak(policy.blis_threads);
  double peak_gflops = args.get_float("--peak-gflops", peak["gflops"].get<double>());
  std::printf(
      "%s\nBLIS %s; fp32 peak %.1f GFLOP/s = %d cores x %d FLOP/cycle x %.2f GHz "
      "(measured clock)\n\n",
      policy.describe().c_str(), blis_version(), peak_gflops, peak["cores"].get<int>(),
      peak["flops_per_cycle"].get<int>(), peak["ghz"].get<double>());
  std::printf("%-28s %10s %10s %8s\n", "shape (m x k -> n)", "ms", "GFLOP/s", "of peak");

  nlohmann::json rows = nlohmann::json::array();
  auto run = [&](const std::string& name, int64_t m, int64_t k, int64_t n) {
    Tensor a({m, k}), b({k, n}), c({m, n});
    a.fill(0.5f);
    b.fill(0.25f);
    double t = median_time(
        [&] { gemm(Trans::kNo, Trans::kNo, 1.0f, a.view(), b.view(), 0.0f, c.view()); });
    double gflops = 2.0 * m * n * k / t / 1e9;
    std::printf("%-28s %10.3f %10.1f %7.1f%%\n", name.c_str(), t * 1e3, gflops,
                100 * gflops / peak_gflops);
    rows.push_back({{"name", name},
                    {"m", m},
                    {"k", k},
                    {"n", n},
                    {"seconds", t},
                    {"gflops", gflops},
                    {"ratio_vs_peak", gflops / peak_gflops}});
  };
  for (int64_t t : tokens) {
    run(cat("up   ", t, "x", d, " -> ", f), t, d, f);
    run(cat("down ", t, "x", f, " -> ", d), t, f, d);
  }
  run("square 2048^3", 2048, 2048, 2048);
  if (json) {
    nlohmann::json out = {
        {"bench", "gemm"}, {"blis", blis_version()},     {"threads", policy.blis_threads},
        {"peak", peak},    {"peak_gflops", peak_gflops}, {"shapes", rows}};
    std::printf("%s\n", out.dump().c_str());
  }
  return 0;
}

}  // namespace
MOE_BENCH("gemm", "BLIS sgemm GFLOP/s on expert shapes and 2048^3 vs fp32 peak", bench_gemm);
}  // namespace moe::bench
