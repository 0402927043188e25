// File: cpu.hpp — this CPU's fp32 peak, the denominator of every MFU and "of peak" figure.
//
// peak = cores x FLOP/cycle x clock, where FLOP/cycle comes from the ISA (SSE 8, AVX 16,
// AVX2 + FMA 32, AVX-512 64 on Intel; AMD runs AVX-512 on 256-bit pipes, so 32) and the clock is
// measured, not read: a loop-carried chain of integer adds retires one add per cycle, so it
// sees the clock the core actually runs at, turbo included; the fastest of 60 short runs is
// kept, so a busy machine does not read low. Takes about 0.1 s.
#pragma once

namespace moe {

struct CpuPeak {
  int cores = 1;
  int flops_per_cycle = 8;
  double ghz = 0.0;
  double gflops = 0.0;  // cores * flops_per_cycle * ghz
};

CpuPeak measure_cpu_peak(int cores);

}  // namespace moe
