#include "runtime/cpu.hpp"

#include <algorithm>
#include <chrono>

namespace moe {

namespace {

// Many short runs, keeping the fastest: a run that the scheduler interrupts (another process
// on the core) only reads low, so the maximum is the clock of an undisturbed core.
double measure_ghz() {
  const long n = 4'000'000;  // about 1 ms at 3-4 GHz
  double best = 0;
  for (int rep = 0; rep < 60; ++rep) {
    long x = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; ++i) asm volatile("add $1, %0" : "+r"(x));
    double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, n / t / 1e9);
  }
  return best;
}

}  // namespace

CpuPeak measure_cpu_peak(int cores) {
  CpuPeak p;
  p.cores = cores;
  if (__builtin_cpu_supports("avx")) p.flops_per_cycle = 16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) p.flops_per_cycle = 32;
  if (__builtin_cpu_supports("avx512f") && !__builtin_cpu_is("amd")) p.flops_per_cycle = 64;
  p.ghz = measure_ghz();
  p.gflops = cores * p.flops_per_cycle * p.ghz;
  return p;
}

}  // namespace moe
