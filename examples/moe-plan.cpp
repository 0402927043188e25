// moe-plan: predicted step time, exchange time and efficiency of a config at many node counts
// (the cost model of model/cost_model.hpp), and its check against measured scaling runs.
//   moe-plan --config cfg.yaml [--set k=v] --nodes 1,8,64,512 --alpha 2e-6 --beta 12.5e9
//            [--ranks-per-node R] [--threads T] [--cores-per-node C] [--mode weak|strong|both]
//            [--gflops G | --gflops measured | --rates moe-bench-gemm.json]
//            [--alpha-intra S] [--beta-intra B] [--mem-gbs G] [--imbalance F] [--rebalance R]
//            [--other-us-per-token U] [--micro-batch M] [--global-batch G] [--vocab V]
//   moe-plan --config cfg.yaml --validate runs/scaling/scaling.csv [same rate/network flags]
// Runs on one process, no MPI launch needed. "measured" times BLIS at the model's own GEMM
// shapes on --threads threads (about a second) and a memory copy for the memory-bound parts.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/cost_model.hpp"
#include "runtime/config.hpp"
#include "runtime/data.hpp"
#include "runtime/error.hpp"
#include "runtime/gemm.hpp"
#include "runtime/log.hpp"
#include "runtime/run.hpp"
#include "runtime/tensor.hpp"
#include "runtime/threads.hpp"

namespace {

using moe::cat;
using moe::Error;
using moe::ErrorKind;
namespace mm = moe::model;

[[noreturn]] void bad(const std::string& what) {
  throw Error(ErrorKind::kConfig, cat("moe-plan: ", what));
}

double to_double(const std::string& flag, const std::string& v, double lo) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end || !std::isfinite(x) || x < lo)
    bad(cat(flag, " expects a number >= ", lo, ", got '", v, "'"));
  return x;
}

int64_t to_int(const std::string& flag, const std::string& v, int64_t lo) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || x < lo) bad(cat(flag, " expects an integer >= ", lo, ", got '", v, "'"));
  return x;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Best of 3 timings of f, each repeated for at least 30 ms; one warm-up call first.
double best_time(const std::function<void()>& f) {
  f();
  double best = 1e30;
  for (int s = 0; s < 3; ++s) {
    int reps = 0;
    const double t0 = now_s();
    double t = 0;
    do {
      f();
      ++reps;
      t = now_s() - t0;
    } while (t < 0.03);
    best = std::min(best, t / reps);
  }
  return best;
}

double measure_gemm_gflops(int64_t m, int64_t k, int64_t n) {
  moe::Tensor a({m, k}), b({k, n}), c({m, n});
  a.fill(0.5f);
  b.fill(0.25f);
  const double t = best_time([&] {
    moe::gemm(moe::Trans::kNo, moe::Trans::kNo, 1.0f, a.view(), b.view(), 0.0f, c.view());
  });
  return 2.0 * static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(n) / t / 1e9;
}

// Bytes moved per second by a large copy (read + write), the rate of the memory-bound sweeps.
double measure_copy_bytes_per_s() {
  const size_t n = size_t(16) << 20;  // 64 MiB of floats
  std::vector<float> a(n, 1.0f), b(n, 0.0f);
  const double t = best_time([&] { std::memcpy(b.data(), a.data(), n * sizeof(float)); });
  return 2.0 * static_cast<double>(n * sizeof(float)) / t;
}

std::vector<int64_t> parse_list(const std::string& flag, const std::string& v) {
  std::vector<int64_t> out;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(to_int(flag, item, 1));
  if (out.empty()) bad(cat(flag, " expects a comma-separated list, got '", v, "'"));
  return out;
}

// One row of the scaling driver's CSV (examples/scaling/scaling.py).
struct Measured {
  std::string mode;
  int ranks = 0, nodes = 1, threads = 1;
  int64_t micro_batch = 0, global_batch = 0;
  double step_s = 0, exchange_fraction = 0, expert_imbalance = 1;
};

std::vector<Measured> read_scaling_csv(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(ErrorKind::kData, cat("moe-plan: --validate ", path, ": cannot open"));
  std::string line;
  std::getline(in, line);
  std::vector<std::string> head;
  std::stringstream hs(line);
  for (std::string h; std::getline(hs, h, ',');) head.push_back(h);
  auto col = [&](const std::string& name) -> size_t {
    auto it = std::find(head.begin(), head.end(), name);
    if (it == head.end())
      throw Error(ErrorKind::kData, cat("moe-plan: ", path, ": no column '", name,
                                        "' (expected the CSV of examples/scaling/scaling.py)"));
    return static_cast<size_t>(it - head.begin());
  };
  const size_t c_mode = col("mode"), c_ranks = col("ranks"), c_nodes = col("nodes"),
               c_threads = col("threads"), c_mb = col("micro_batch"), c_gb = col("global_batch"),
               c_step = col("step_s"), c_exch = col("exchange_fraction"),
               c_imb = col("expert_imbalance");
  std::vector<Measured> rows;
  int line_no = 1;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    std::vector<std::string> f;
    std::stringstream ls(line);
    for (std::string x; std::getline(ls, x, ',');) f.push_back(x);
    if (f.size() < head.size())
      throw Error(ErrorKind::kData, cat("moe-plan: ", path, ":", line_no, ": ", f.size(),
                                        " fields, the header has ", head.size()));
    const std::string where = cat(path, ":", line_no);
    Measured m;
    m.mode = f[c_mode];
    m.ranks = static_cast<int>(to_int(where + " ranks", f[c_ranks], 1));
    m.nodes = static_cast<int>(to_int(where + " nodes", f[c_nodes], 1));
    m.threads = static_cast<int>(to_int(where + " threads", f[c_threads], 1));
    m.micro_batch = to_int(where + " micro_batch", f[c_mb], 1);
    m.global_batch = to_int(where + " global_batch", f[c_gb], 1);
    m.step_s = to_double(where + " step_s", f[c_step], 0);
    m.exchange_fraction = to_double(where + " exchange_fraction", f[c_exch], 0);
    m.expert_imbalance = to_double(where + " expert_imbalance", f[c_imb], 0);
    rows.push_back(m);
  }
  if (rows.empty()) throw Error(ErrorKind::kData, cat("moe-plan: ", path, ": no rows"));
  return rows;
}

struct Options {
  std::vector<int64_t> nodes{1, 8, 64, 512};
  int ranks_per_node = 1, threads = 1, cores_per_node = 0;
  std::string mode = "both";
  std::string gflops = "measured", rates_file, validate;
  std::string beta_intra = "measured", mem_gbs = "measured";
  double imbalance = 1.0, other_us_per_token = 0;
  int rebalance = -1;  // --rebalance R: replicas per layer; -1 = off
  int64_t micro_batch = 0, global_batch = 0, vocab = 0;
  mm::NetworkParams net;
};

// Rates: a constant, a moe-bench gemm --json file, or BLIS timed here at every shape `want`s.
mm::GemmRates make_rates(const Options& o, const std::vector<mm::GemmTerm>& want) {
  if (!o.rates_file.empty()) {
    std::ifstream in(o.rates_file);
    if (!in)
      throw Error(ErrorKind::kData, cat("moe-plan: --rates ", o.rates_file, ": cannot open"));
    // moe-bench prints text, then the JSON object as its last line.
    std::string line, last;
    while (std::getline(in, line))
      if (!line.empty() && line[0] == '{') last = line;
    nlohmann::json j = nlohmann::json::parse(last, nullptr, false);
    if (j.is_discarded() || !j.contains("shapes") || !j["shapes"].is_array())
      throw Error(ErrorKind::kData, cat("moe-plan: --rates ", o.rates_file,
                                        ": no JSON line with \"shapes\" (moe-bench gemm --json)"));
    mm::GemmRates r;
    for (const auto& s : j["shapes"])
      r.add(s.at("m").get<int64_t>(), s.at("k").get<int64_t>(), s.at("n").get<int64_t>(),
            s.at("gflops").get<double>());
    return r;
  }
  if (o.gflops != "measured") return mm::GemmRates(to_double("--gflops", o.gflops, 1e-6));
  // Rows beyond 4096 are timed at 4096 (BLIS's rate has long saturated there), so a 1-rank
  // reference of a huge batch does not take minutes to measure.
  mm::GemmRates r;
  std::map<std::array<int64_t, 3>, double> timed;
  for (const mm::GemmTerm& g : want) {
    if (r.has(g.m, g.k, g.n)) continue;
    const std::array<int64_t, 3> key{std::min<int64_t>(g.m, 4096), g.k, g.n};
    if (!timed.count(key)) timed[key] = measure_gemm_gflops(key[0], key[1], key[2]);
    r.add(g.m, g.k, g.n, timed[key]);
  }
  return r;
}

std::string secs(double s) {
  char b[32];
  if (s == 0)
    std::snprintf(b, sizeof b, "0");
  else if (s < 1e-3)
    std::snprintf(b, sizeof b, "%.1fus", s * 1e6);
  else if (s < 1)
    std::snprintf(b, sizeof b, "%.1fms", s * 1e3);
  else
    std::snprintf(b, sizeof b, "%.2fs", s);
  return b;
}

// The workload of `mode` at P ranks: weak keeps micro_batch per rank (global = P x micro),
// strong splits global_batch over the ranks (micro = global / P). No accumulation.
bool workload(const std::string& mode, int64_t P, int64_t micro, int64_t global, double imb,
              mm::Workload* w, std::string* why) {
  w->load_factor = imb;
  w->accumulation = 1;
  if (mode == "weak") {
    w->micro_batch = micro;
    return true;
  }
  if (global % P != 0) {
    *why = cat("global batch ", global, " not divisible by ", P, " ranks");
    return false;
  }
  w->micro_batch = global / P;
  return true;
}

int plan(const moe::Config& config, const Options& o) {
  const std::string data_path = config.get_string("data.path");
  int64_t vocab = o.vocab;
  if (vocab == 0 && config.get_int("model.vocab_size") == 0) {
    std::ifstream probe(data_path);
    if (!probe)
      bad(cat("model.vocab_size is 0 (take it from the data) and ", data_path,
              " does not exist: give --vocab V or --set model.vocab_size=V"));
    vocab = moe::read_token_file_info(data_path).vocab_size;
  }
  const mm::ModelConfig mc =
      mm::ModelConfig::from(config, vocab > 0 ? vocab : config.get_int("model.vocab_size"));
  const int64_t T = config.get_int("train.seq_len");
  const int64_t micro = o.micro_batch ? o.micro_batch : config.get_int("train.micro_batch");
  const int64_t global = o.global_batch ? o.global_batch : config.get_int("train.global_batch");
  const mm::CostModel model(mc, T);

  moe::ThreadPolicy policy;
  policy.omp_threads = o.threads;
  policy.apply();

  // Every layout the run predicts, to measure each GEMM shape once.
  struct Case {
    std::string mode;
    mm::Layout layout;
    mm::Workload work;
    bool ok = true;
    std::string why;
    double measured_step = 0, measured_exch = 0;
  };
  std::vector<Case> cases;
  std::vector<Measured> measured;
  const std::vector<std::string> modes = o.mode == "both"
                                             ? std::vector<std::string>{"weak", "strong"}
                                             : std::vector<std::string>{o.mode};
  if (!o.validate.empty()) {
    measured = read_scaling_csv(o.validate);
    for (const Measured& m : measured) {
      Case c;
      c.mode = m.mode;
      c.layout = {m.nodes, (m.ranks + m.nodes - 1) / m.nodes, m.threads, o.cores_per_node};
      c.work.micro_batch = m.micro_batch;
      c.work.accumulation = std::max<int64_t>(1, m.global_batch / (m.micro_batch * m.ranks));
      c.work.load_factor = m.expert_imbalance;
      c.measured_step = m.step_s;
      c.measured_exch = m.exchange_fraction;
      cases.push_back(c);
    }
  } else {
    for (const std::string& mode : modes) {
      std::vector<mm::Layout> layouts;
      for (int64_t n : o.nodes)
        layouts.push_back({static_cast<int>(n), o.ranks_per_node, o.threads, o.cores_per_node});
      for (const mm::Layout& l : layouts) {
        Case c;
        c.mode = mode;
        c.layout = l;
        c.ok = workload(mode, l.ranks(), micro, global, o.imbalance, &c.work, &c.why);
        c.work.rebalance_replicas = o.rebalance;
        cases.push_back(c);
      }
    }
  }
  std::vector<mm::GemmTerm> want;
  for (const Case& c : cases)
    if (c.ok && (mc.n_moe_layers() == 0 || c.layout.ranks() <= mc.min_experts()))
      for (const mm::GemmTerm& g : model.gemms(c.layout, c.work)) want.push_back(g);
  const double t0 = now_s();
  const mm::GemmRates rates = make_rates(o, want);
  mm::OtherRates other;
  other.mem_bytes_per_s = o.mem_gbs == "measured" ? measure_copy_bytes_per_s()
                                                  : to_double("--mem-gbs", o.mem_gbs, 1e-6) * 1e9;
  other.seconds_per_token = o.other_us_per_token * 1e-6;
  mm::NetworkParams net = o.net;
  net.beta_intra = o.beta_intra == "measured" ? other.mem_bytes_per_s / 2
                                              : to_double("--beta-intra", o.beta_intra, 1);

  // Blocks of their own expert counts (model.moe.layer_experts): listed, and summed per block.
  std::string experts = cat(mc.moe.n_experts);
  if (!mc.layer_experts.empty()) {
    experts.clear();
    for (int l = 0; l < mc.n_layers; ++l)
      if (mc.is_moe(l)) experts += cat(experts.empty() ? "(" : ",", mc.experts(l));
    experts += ")";
  }
  std::printf(
      "moe-plan: %d blocks (%d MoE), d_model %lld, %s experts top-%d, expert d_ff %lld, "
      "vocab %lld, seq_len %lld; %s dense parameters (all-reduced), %s per expert, %s in all "
      "experts\n",
      mc.n_layers, mc.n_moe_layers(), static_cast<long long>(mc.d_model), experts.c_str(),
      mc.moe.top_k, static_cast<long long>(mc.moe.d_ff), static_cast<long long>(mc.vocab_size),
      static_cast<long long>(T), moe::format_si(model.dense_params()).c_str(),
      moe::format_si(model.expert_params()).c_str(),
      moe::format_si(model.expert_params_total()).c_str());
  if (!o.rates_file.empty())
    std::printf("compute: GEMM rates from %s (%zu shapes, nearest shape)", o.rates_file.c_str(),
                rates.size());
  else if (o.gflops == "measured") {
    double lo = 1e30, hi = 0;
    for (const mm::GemmTerm& g : want) {
      lo = std::min(lo, rates.gflops(g.m, g.k, g.n));
      hi = std::max(hi, rates.gflops(g.m, g.k, g.n));
    }
    std::printf(
        "compute: BLIS measured here at %zu GEMM shapes on %d thread(s) in %.1f s: "
        "%.1f to %.1f GFLOP/s",
        rates.size(), o.threads, now_s() - t0, lo, hi);
  } else {
    std::printf("compute: %s GFLOP/s per rank on every GEMM", o.gflops.c_str());
  }
  std::printf("; memory %.1f GB/s%s; other %.3g us/token; expert imbalance %s\n",
              other.mem_bytes_per_s / 1e9, o.mem_gbs == "measured" ? " (measured copy)" : "",
              o.other_us_per_token, o.validate.empty() ? cat(o.imbalance).c_str() : "from the CSV");
  if (o.rebalance >= 0)
    std::printf(
        "rebalancing: greedy LPT placement with up to %d replica(s) per MoE layer "
        "(comm.rebalance); load = busiest rank's expert load over the mean\n",
        o.rebalance);
  std::printf(
      "network: between nodes alpha %.3g s, beta %.3g B/s; inside a node alpha %.3g s, "
      "beta %.3g B/s%s\n",
      net.alpha, net.beta, net.alpha_intra, net.beta_intra,
      o.beta_intra == "measured" ? " (half the measured copy rate)" : "");

  auto predict = [&](const Case& c, const mm::OtherRates& oth) {
    return model.predict(c.layout, c.work, rates, net, oth);
  };

  if (!o.validate.empty()) {
    // Calibration: the non-GEMM time per token that makes the 1-rank weak run exact (or the
    // first 1-rank row); then every other row is a prediction.
    const Case* ref = nullptr;
    for (const Case& c : cases)
      if (c.layout.ranks() == 1 && (!ref || (c.mode == "weak" && ref->mode != "weak"))) ref = &c;
    double other_tok = 0;
    if (ref) {
      mm::OtherRates none = other;
      none.seconds_per_token = 0;
      const mm::StepPrediction p = predict(*ref, none);
      other_tok = std::max(
          0.0, (ref->measured_step - p.step_flat_s) / static_cast<double>(p.tokens_per_rank));
    }
    mm::OtherRates cal = other;
    cal.seconds_per_token = other_tok;
    std::printf(
        "\nvalidation against %s (one node: the flat exchange is what ran; cores per "
        "node %d%s)\n",
        o.validate.c_str(), o.cores_per_node,
        o.cores_per_node ? "" : " = no oversubscription modelled");
    std::printf(
        "calibrated: other = %.3g us/token from the 1-rank %s run (what the GEMMs, "
        "optimiser and exchanges leave unexplained)\n\n",
        other_tok * 1e6, ref ? ref->mode.c_str() : "(none)");
    std::printf("%-6s %5s %8s | %9s %9s %7s | %9s %7s | %6s %6s | %5s\n", "mode", "ranks",
                "tok/rank", "measured", "rates", "error", "calib.", "error", "exch", "pred",
                "over");
    double sum_rates = 0, sum_cal = 0;
    int n_err = 0;
    for (const Case& c : cases) {
      const mm::StepPrediction p0 = predict(c, other);
      const mm::StepPrediction p1 = predict(c, cal);
      if (!p0.feasible) {
        std::printf("%-6s %5d  not modelled: %s\n", c.mode.c_str(), c.layout.ranks(),
                    p0.why.c_str());
        continue;
      }
      const double e0 = (p0.step_flat_s - c.measured_step) / c.measured_step;
      const double e1 = (p1.step_flat_s - c.measured_step) / c.measured_step;
      const bool is_ref = ref && &c == ref;
      if (!is_ref) {
        sum_rates += std::fabs(e0);
        sum_cal += std::fabs(e1);
        ++n_err;
      }
      std::printf("%-6s %5d %8lld | %9s %9s %+6.0f%% | %9s %+6.0f%%%s | %5.1f%% %5.1f%% | %5.2g\n",
                  c.mode.c_str(), c.layout.ranks(), static_cast<long long>(p0.tokens_per_rank),
                  secs(c.measured_step).c_str(), secs(p0.step_flat_s).c_str(), 100 * e0,
                  secs(p1.step_flat_s).c_str(), 100 * e1, is_ref ? "*" : " ", 100 * c.measured_exch,
                  100 * p1.a2a_flat_s / p1.step_flat_s, p0.oversubscription);
    }
    if (n_err > 0)
      std::printf(
          "\nmean |error| over the %d uncalibrated rows: rates only %.0f%%, calibrated "
          "%.0f%% (* = the calibration row; exch = measured vs predicted All2All share)\n",
          n_err, 100 * sum_rates / n_err, 100 * sum_cal / n_err);
    return 0;
  }

  for (const std::string& mode : modes) {
    std::printf("\n%s scaling: %s, %d rank(s) per node x %d thread(s)\n", mode.c_str(),
                mode == "weak"
                    ? cat(micro, " sequences x ", T, " tokens per rank").c_str()
                    : cat("global batch ", global, " sequences x ", T, " tokens").c_str(),
                o.ranks_per_node, o.threads);
    std::printf("%6s %6s %8s | %9s %9s %9s %9s %9s | %9s %9s | %10s %10s | %5s %5s | %5s %4s\n",
                "nodes", "ranks", "tok/rank", "compute", "experts", "a2a flat", "a2a hier",
                "allreduce", "step flat", "step hier", "tok/s flat", "tok/s hier", "eff f", "eff h",
                "load", "repl");
    // Efficiency against the first feasible row (the smallest node count given).
    const mm::StepPrediction* base = nullptr;
    std::vector<mm::StepPrediction> preds;
    preds.reserve(cases.size());
    for (const Case& c : cases) {
      if (c.mode != mode) continue;
      preds.push_back(c.ok ? predict(c, other) : mm::StepPrediction{});
      mm::StepPrediction& p = preds.back();
      if (!c.ok) {
        p.feasible = false;
        p.why = c.why;
      }
      if (!p.feasible) {
        std::printf("%6d %6d  not possible: %s\n", c.layout.nodes, c.layout.ranks(), p.why.c_str());
        continue;
      }
      if (!base) base = &p;
      const double scale = static_cast<double>(c.layout.ranks()) / base->ranks;
      const double eff_f = p.tokens_per_s_flat / (scale * base->tokens_per_s_flat);
      const double eff_h = p.tokens_per_s_hier / (scale * base->tokens_per_s_flat);
      std::printf(
          "%6d %6d %8s | %9s %9s %9s %9s %9s | %9s %9s | %10s %10s | %5.2f %5.2f | %5.2f %4d\n",
          c.layout.nodes, c.layout.ranks(), moe::format_si(p.tokens_per_rank).c_str(),
          secs(p.compute_s).c_str(), secs(p.expert_s * p.oversubscription).c_str(),
          secs(p.a2a_flat_s).c_str(), secs(std::min(p.a2a_hier_s, p.a2a_hier2d_s)).c_str(),
          secs(p.allreduce_s).c_str(), secs(p.step_flat_s).c_str(), secs(p.step_hier_s).c_str(),
          moe::format_si(p.tokens_per_s_flat).c_str(), moe::format_si(p.tokens_per_s_hier).c_str(),
          eff_f, eff_h, p.expert_load, p.replicas);
    }
  }
  std::printf(
      "\na2a hier = the faster of the leader and the 2D node-aware variants; efficiency = "
      "per-rank tokens/s against the first row's (flat); compute includes the busiest rank's "
      "experts and the optimiser.\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return moe::run_or_die([&]() -> int {
    std::vector<std::string> rest;
    moe::Config config =
        moe::config_from_args(std::vector<std::string>(argv + 1, argv + argc), &rest);
    Options o;
    for (size_t i = 0; i < rest.size(); ++i) {
      const std::string& a = rest[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= rest.size()) bad(cat(a, " needs a value"));
        return rest[++i];
      };
      if (a == "--nodes") {
        o.nodes = parse_list(a, value());
      } else if (a == "--ranks-per-node") {
        o.ranks_per_node = static_cast<int>(to_int(a, value(), 1));
      } else if (a == "--threads") {
        o.threads = static_cast<int>(to_int(a, value(), 1));
      } else if (a == "--cores-per-node") {
        o.cores_per_node = static_cast<int>(to_int(a, value(), 0));
      } else if (a == "--mode") {
        o.mode = value();
        if (o.mode != "weak" && o.mode != "strong" && o.mode != "both")
          bad(cat("--mode expects weak, strong or both, got '", o.mode, "'"));
      } else if (a == "--gflops") {
        o.gflops = value();
      } else if (a == "--rates") {
        o.rates_file = value();
      } else if (a == "--alpha") {
        o.net.alpha = to_double(a, value(), 0);
      } else if (a == "--beta") {
        o.net.beta = to_double(a, value(), 1);
      } else if (a == "--alpha-intra") {
        o.net.alpha_intra = to_double(a, value(), 0);
      } else if (a == "--beta-intra") {
        o.beta_intra = value();
      } else if (a == "--mem-gbs") {
        o.mem_gbs = value();
      } else if (a == "--imbalance") {
        o.imbalance = to_double(a, value(), 1);
      } else if (a == "--rebalance") {
        o.rebalance = static_cast<int>(to_int(a, value(), 0));
      } else if (a == "--other-us-per-token") {
        o.other_us_per_token = to_double(a, value(), 0);
      } else if (a == "--micro-batch") {
        o.micro_batch = to_int(a, value(), 1);
      } else if (a == "--global-batch") {
        o.global_batch = to_int(a, value(), 1);
      } else if (a == "--vocab") {
        o.vocab = to_int(a, value(), 1);
      } else if (a == "--validate") {
        o.validate = value();
      } else if (a == "--help" || a == "-h") {
        std::printf(
            "usage: moe-plan --config FILE [--set key=value ...] [--nodes 1,8,64,512]\n"
            "                [--ranks-per-node R] [--threads T] [--cores-per-node C]\n"
            "                [--mode weak|strong|both] [--micro-batch M] [--global-batch G]\n"
            "                [--alpha S] [--beta B/s] [--alpha-intra S] [--beta-intra B/s]\n"
            "                [--gflops G|measured] [--rates moe-bench-gemm.json] [--mem-gbs G]\n"
            "                [--imbalance F] [--rebalance R] [--other-us-per-token U] [--vocab V]\n"
            "                [--validate scaling.csv]\n");
        return 0;
      } else {
        bad(cat("unknown argument '", a, "' (see --help)"));
      }
    }
    return plan(config, o);
  });
}
