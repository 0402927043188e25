// moe-bench peer: product-key retrieval throughput (PEER, model/routers/product_key.hpp) on one
// process, against scoring every one of the N keys with one BLIS GEMM, measured in the same run.
//   moe-bench peer [--n-sub-keys 1024] [--d-key 128] [--top-k 16] [--queries 1024]
//                  [--threads 0] [--json]
// Figures:
//   queries_per_s        queries / median product_key_topk time (two [M, n] GEMMs, two top-k
//                        over n, one top-k over k^2 sums per query)
//   brute_queries_per_s  queries / the time of the GEMM that scores all N keys (q [M, dk] x
//                        keys [N, dk]^T), timed on one chunk of keys and scaled to N; no top-k,
//                        so this is an upper bound on brute-force retrieval
//   speedup              queries_per_s / brute_queries_per_s
// A query here is one (token, head) pair: a PEER layer with H heads runs H queries per token.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "examples/bench/bench.hpp"
#include "model/params.hpp"
#include "model/routers/product_key.hpp"
#include "runtime/gemm.hpp"
#include "runtime/threads.hpp"

namespace moe::bench {
namespace {

int bench_peer(const std::vector<std::string>& argv) {
  Args args(argv);
  ThreadPolicy policy;
  policy.omp_threads = static_cast<int>(args.get_int("--threads", 0));
  policy.apply();
  const int64_t n = args.get_int("--n-sub-keys", 1024), dk = args.get_int("--d-key", 128);
  const int k = static_cast<int>(args.get_int("--top-k", 16));
  const int64_t M = args.get_int("--queries", 1024);
  const bool json = args.flag("--json");
  if (dk % 2 != 0 || k < 1 || k > n || M < 1) {
    std::fprintf(stderr, "moe-bench peer: need an even --d-key and 1 <= --top-k <= --n-sub-keys\n");
    return 2;
  }
  const int64_t N = n * n;

  Tensor q({M, dk}), c1({n, dk / 2}), c2({n, dk / 2});
  model::init_uniform(q.view(), 1.0f, 1, 0);
  model::init_uniform(c1.view(), 1.0f, 1, 1);
  model::init_uniform(c2.view(), 1.0f, 1, 2);
  model::ProductKeyScratch scratch;
  std::vector<int32_t> ids(static_cast<size_t>(M * k));
  std::vector<float> scores(static_cast<size_t>(M * k));
  const double t_pk = median_time([&] {
    product_key_topk(q.view(), c1.view(), c2.view(), k, scratch, ids.data(), scores.data());
  });

  // Brute force: scores of all N full keys. One chunk of keys, scaled to N (the full [N, dk]
  // key table would be N dk floats, 512 MiB at N = 1024^2, dk = 128).
  const int64_t chunk = std::min<int64_t>(N, 65536);
  Tensor keys({chunk, dk}), s({M, chunk});
  model::init_uniform(keys.view(), 1.0f, 1, 3);
  const double t_chunk = median_time(
      [&] { gemm(Trans::kNo, Trans::kYes, 1.0f, q.view(), keys.view(), 0.0f, s.view()); }, 3);
  const double t_brute = t_chunk * static_cast<double>(N) / static_cast<double>(chunk);

  const double qps = static_cast<double>(M) / t_pk, brute_qps = static_cast<double>(M) / t_brute;
  std::printf("%s\nproduct-key top-%d of N = %lld (n = %lld), d_key %lld, %lld queries\n",
              policy.describe().c_str(), k, static_cast<long long>(N), static_cast<long long>(n),
              static_cast<long long>(dk), static_cast<long long>(M));
  std::printf("  product keys:           %10.3f ms  %12.0f queries/s\n", t_pk * 1e3, qps);
  std::printf("  all-N scoring GEMM:     %10.3f ms  %12.0f queries/s  (%lld-key chunk x %lld)\n",
              t_brute * 1e3, brute_qps, static_cast<long long>(chunk),
              static_cast<long long>(N / chunk));
  std::printf("  ratio product keys / all-N GEMM: %.1fx\n", qps / brute_qps);
  if (json) {
    nlohmann::json out = {{"bench", "peer"},
                          {"threads", policy.omp_threads},
                          {"n_sub_keys", n},
                          {"n_experts", N},
                          {"d_key", dk},
                          {"top_k", k},
                          {"queries", M},
                          {"seconds", t_pk},
                          {"queries_per_s", qps},
                          {"brute_seconds", t_brute},
                          {"brute_queries_per_s", brute_qps},
                          {"speedup", qps / brute_qps}};
    std::printf("%s\n", out.dump().c_str());
  }
  return 0;
}

}  // namespace
MOE_BENCH("peer", "PEER product-key retrieval queries/s vs scoring all N keys with one GEMM",
          bench_peer);
}  // namespace moe::bench
