#include "runtime/threads.hpp"

#include <blis.h>
#include <omp.h>

#include <cstdlib>
#include <thread>

#include "runtime/error.hpp"

namespace moe {

namespace {
ThreadPolicy g_policy{1, 1};
bool g_applied = false;
}  // namespace

void ThreadPolicy::apply(int ranks_on_node) {
  if (omp_threads <= 0) {
    const char* env = std::getenv("OMP_NUM_THREADS");
    int n = env ? std::atoi(env) : 0;
    int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    omp_threads = n > 0 ? n : std::max(1, cores / std::max(1, ranks_on_node));
  }
  if (blis_threads <= 0) blis_threads = omp_threads;
  omp_set_num_threads(omp_threads);
  bli_thread_set_num_threads(blis_threads);
  g_policy = *this;
  g_applied = true;
}

std::string ThreadPolicy::describe() const {
  return cat("threads: omp=", omp_threads, " blis=", blis_threads,
             " (GEMMs inside OpenMP loops use 1 BLIS thread)");
}

const ThreadPolicy& thread_policy() {
  if (!g_applied) {
    ThreadPolicy p;
    p.apply();
  }
  return g_policy;
}

bool in_parallel_region() {
  return omp_in_parallel() && omp_get_num_threads() > 1;
}

}  // namespace moe
