// File: bench.hpp — shared pieces of `moe-bench`: subcommand registry, timing, JSON output.
//
// Each subcommand lives in its own bench_<name>.cpp and registers with MOE_BENCH(name, help).
// Benchmarks print ratios measured in the same run against a reference (BLIS peak, raw
// MPI_Alltoallv, ...); with --json the last line of stdout is one JSON object.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::bench {

using Main = std::function<int(const std::vector<std::string>& args)>;

struct Command {
  std::string name;
  std::string help;
  Main main;
};

std::vector<Command>& registry();

struct Registrar {
  Registrar(const char* name, const char* help, Main main) {
    registry().push_back({name, help, std::move(main)});
  }
};

#define MOE_BENCH(name, help, fn) static ::moe::bench::Registrar moe_bench_reg_##fn(name, help, fn)

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median seconds of `samples` runs of f, each repeated until at least min_time seconds pass;
// one warm-up call first. Returns the median time of a single call.
double median_time(const std::function<void()>& f, int samples = 5, double min_time = 0.2);

// Simple flag parsing for subcommands: --name value, --flag.
struct Args {
  explicit Args(const std::vector<std::string>& args);
  bool flag(const std::string& name) const;
  std::string get(const std::string& name, const std::string& fallback) const;
  int64_t get_int(const std::string& name, int64_t fallback) const;
  double get_float(const std::string& name, double fallback) const;
  std::vector<int64_t> get_ints(const std::string& name,
                                const std::vector<int64_t>& fallback) const;
  std::vector<std::string> items;
};

// runtime/cpu.hpp's measured fp32 peak as JSON: cores, flops_per_cycle, ghz, gflops.
nlohmann::json cpu_peak(int cores);

}  // namespace moe::bench
