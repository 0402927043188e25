#include "runtime/log.hpp"

#include <cmath>
#include <filesystem>
#include <iostream>

namespace moe {
namespace log {

namespace {
int g_rank = 0;
int g_world = 1;
Level g_level = Level::kInfo;
std::mutex g_mutex;
}  // namespace

void init(int rank, int world_size, const std::string& level) {
  g_rank = rank;
  g_world = world_size;
  if (level == "debug")
    g_level = Level::kDebug;
  else if (level == "info")
    g_level = Level::kInfo;
  else if (level == "warn")
    g_level = Level::kWarn;
  else if (level == "error")
    g_level = Level::kError;
  else
    throw Error(ErrorKind::kConfig, cat("log level '", level, "' is not debug|info|warn|error"));
}

int rank() {
  return g_rank;
}

bool enabled(Level level) {
  return level >= g_level;
}

void write(Level level, bool rank0_only, const std::string& text) {
  if (rank0_only && g_rank != 0) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  FILE* f = level >= Level::kWarn ? stderr : stdout;
  const char* tag = level == Level::kWarn ? "warning: " : level == Level::kError ? "error: " : "";
  if (rank0_only && g_world >= 1)
    std::fprintf(f, "%s%s\n", tag, text.c_str());
  else
    std::fprintf(f, "[r%d] %s%s\n", g_rank, tag, text.c_str());
  std::fflush(f);
}

}  // namespace log

std::string format_si(double v) {
  char buf[32];
  double a = std::abs(v);
  if (a >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2fG", v / 1e9);
  else if (a >= 1e6)
    std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (a >= 1e3)
    std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  long t = std::lround(s);
  if (t < 60)
    std::snprintf(buf, sizeof buf, "%lds", t);
  else if (t < 3600)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  return buf;
}

std::string format_progress(int64_t step, int64_t total_steps, double loss, double aux,
                            double tokens_per_s, double eta_s) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "step %lld/%lld | loss %.4f | aux %.4f | %s tok/s | ETA %s",
                static_cast<long long>(step), static_cast<long long>(total_steps), loss, aux,
                format_si(tokens_per_s).c_str(), format_duration(eta_s).c_str());
  return buf;
}

MetricsWriter::MetricsWriter(const std::string& path, bool enabled) {
  if (!enabled) return;
  std::filesystem::path p(path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  out_ = std::make_unique<std::ofstream>(path, std::ios::app);
  if (!*out_) throw Error(ErrorKind::kConfig, cat(path, ": cannot open metrics file for writing"));
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!out_) return;
  std::lock_guard<std::mutex> lock(*mutex_);
  *out_ << record.dump() << '\n';
  out_->flush();
}

void MetricsWriter::flush() {
  if (out_) out_->flush();
}

}  // namespace moe
