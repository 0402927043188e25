// File: threads.hpp — the thread policy of a rank: OpenMP threads and BLIS threads.
//
// Policy (documented in the README):
//   * runtime.omp_threads (0 = OMP_NUM_THREADS, else the node's cores divided by the ranks on
//     the node) sets the OpenMP team used by our own loops (over experts, tokens, heads).
//   * runtime.blis_threads (0 = same as omp_threads) sets how many threads one large GEMM uses
//     when it is called from serial code.
//   * A GEMM called from inside an OpenMP parallel region (for example one GEMM per expert inside
//     a loop over experts) always runs on 1 BLIS thread, so the two never oversubscribe the cores.
// The policy is applied once per process with ThreadPolicy::apply() and printed at start-up.
#pragma once

#include <string>

namespace moe {

struct ThreadPolicy {
  int omp_threads = 0;   // 0: from OMP_NUM_THREADS, else cores / ranks_on_node
  int blis_threads = 0;  // 0: same as omp_threads

  // Resolves zeros, sets omp_set_num_threads and BLIS's global thread count. ranks_on_node is
  // how many ranks share this machine's cores (so 2 ranks on 2 cores get 1 thread each).
  void apply(int ranks_on_node = 1);
  std::string describe() const;
};

// The policy in force (after apply()).
const ThreadPolicy& thread_policy();

// True inside an OpenMP parallel region with more than one thread.
bool in_parallel_region();

}  // namespace moe
