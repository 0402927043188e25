#include "examples/bench/bench.hpp"

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "runtime/cpu.hpp"
#include "runtime/error.hpp"

namespace moe::bench {

std::vector<Command>& registry() {
  static std::vector<Command> r;
  return r;
}

double median_time(const std::function<void()>& f, int samples, double min_time) {
  f();  // warm-up
  std::vector<double> times;
  for (int s = 0; s < samples; ++s) {
    int reps = 0;
    double t0 = now_s(), t1 = t0;
    do {
      f();
      ++reps;
      t1 = now_s();
    } while (t1 - t0 < min_time);
    times.push_back((t1 - t0) / reps);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

Args::Args(const std::vector<std::string>& args) : items(args) {}

bool Args::flag(const std::string& name) const {
  return std::find(items.begin(), items.end(), name) != items.end();
}

std::string Args::get(const std::string& name, const std::string& fallback) const {
  for (size_t i = 0; i + 1 < items.size(); ++i)
    if (items[i] == name) return items[i + 1];
  return fallback;
}

int64_t Args::get_int(const std::string& name, int64_t fallback) const {
  std::string v = get(name, "");
  if (v.empty()) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (*end) throw Error(ErrorKind::kConfig, cat(name, " expects an integer, got '", v, "'"));
  return x;
}

double Args::get_float(const std::string& name, double fallback) const {
  std::string v = get(name, "");
  if (v.empty()) return fallback;
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (*end) throw Error(ErrorKind::kConfig, cat(name, " expects a number, got '", v, "'"));
  return x;
}

std::vector<int64_t> Args::get_ints(const std::string& name,
                                    const std::vector<int64_t>& fallback) const {
  std::string v = get(name, "");
  if (v.empty()) return fallback;
  std::vector<int64_t> out;
  std::stringstream ss(v);
  for (std::string item; std::getline(ss, item, ',');) {
    char* end = nullptr;
    long long x = std::strtoll(item.c_str(), &end, 10);
    if (*end || item.empty())
      throw Error(ErrorKind::kConfig, cat(name, " expects integers like 1,2,3, got '", v, "'"));
    out.push_back(x);
  }
  return out;
}

nlohmann::json cpu_peak(int cores) {
  CpuPeak p = measure_cpu_peak(cores);
  return {{"cores", p.cores},
          {"flops_per_cycle", p.flops_per_cycle},
          {"ghz", p.ghz},
          {"gflops", p.gflops}};
}

}  // namespace moe::bench
