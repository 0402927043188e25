// File: log.hpp — rank-prefixed logging, the rank-0 progress line, JSON-lines metrics.
//
//   log::info("loaded ", n, " tokens")   every rank, "[r3] loaded ..." on stdout
//   log::info0("...")                     rank 0 only, no prefix
//   log::warn / log::error               every rank, on stderr
// The rank and level are set once by log::init(). Thread safe: one line is written at once.
#pragma once

#include <cstdio>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/error.hpp"

namespace moe {
namespace log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Sets this process's rank, world size and lowest printed level ("debug".."error").
void init(int rank, int world_size, const std::string& level = "info");
int rank();
bool enabled(Level level);
void write(Level level, bool rank0_only, const std::string& text);

template <typename... A>
void debug(const A&... a) {
  if (enabled(Level::kDebug)) write(Level::kDebug, false, cat(a...));
}
template <typename... A>
void info(const A&... a) {
  if (enabled(Level::kInfo)) write(Level::kInfo, false, cat(a...));
}
template <typename... A>
void info0(const A&... a) {
  if (enabled(Level::kInfo)) write(Level::kInfo, true, cat(a...));
}
template <typename... A>
void warn(const A&... a) {
  if (enabled(Level::kWarn)) write(Level::kWarn, false, cat(a...));
}
template <typename... A>
void error(const A&... a) {
  write(Level::kError, false, cat(a...));
}

}  // namespace log

// The human progress line of rank 0:
//   step 120/5000 | loss 3.412 | aux 0.011 | 81.2k tok/s | ETA 14m
std::string format_progress(int64_t step, int64_t total_steps, double loss, double aux,
                            double tokens_per_s, double eta_s);
// "81.2k", "1.23M": compact numbers for progress lines.
std::string format_si(double v);
// "14m", "2h05m", "37s".
std::string format_duration(double seconds);

// Appends one JSON object per line to a file; rank 0 writes, other ranks hold a closed sink.
class MetricsWriter {
 public:
  MetricsWriter() = default;
  // Opens (appends to) path when enabled; creates the parent directory.
  MetricsWriter(const std::string& path, bool enabled);
  void write(const nlohmann::json& record);
  bool enabled() const { return out_ != nullptr; }
  void flush();

 private:
  std::unique_ptr<std::ofstream> out_;
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();  // movable writer
};

}  // namespace moe
