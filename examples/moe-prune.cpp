// moe-prune: task-aware offline pruning and merging of the experts of a trained MoE checkpoint.
//   mpirun -np N build/bin/moe-prune --checkpoint IN --task-data task.h5 --target-experts E'
//          --output OUT [--method merge|merge-noalign|frequency] [--layers l,...] [--seed S]
//          [--tokens T]
//          [--split train|val] [--decode-tokens n] [--traffic-ranks P] [--eval]
//          [--eval-split train|val]
// Profiles the experts' router logits over the task tokens, clusters them into E' groups,
// merges each group (model/prune.hpp) and writes a checkpoint with E' experts per MoE layer
// (--layers: only in those blocks; the others keep theirs, model.moe.layer_experts) that trains
// (--resume), serves and reshards like any other. Prints the All2All traffic per decode step before
// and after (on P = --traffic-ranks ranks, default the run's, and on P/2, P/4,
// ..., 1); --eval also prints the task loss of the pruned model, on the --eval-split split of
// the task file (default --split: the profiled windows; val: held-out windows).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>

#include "comm/communicator.hpp"
#include "model/prune.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/config.hpp"
#include "runtime/error.hpp"
#include "runtime/log.hpp"
#include "runtime/threads.hpp"

namespace {

using moe::cat;

std::string group_list(const moe::model::LayerPlan& plan) {
  std::string s;
  for (const auto& g : plan.groups) {
    s += s.empty() ? "{" : " {";
    for (size_t m = 0; m < g.members.size(); ++m) s += cat(m ? "," : "", g.members[m]);
    s += "}";
  }
  return s;
}

// The task frequencies of the new experts: each group's members summed.
std::vector<int64_t> merged_frequency(const moe::model::LayerPlan& plan,
                                      const std::vector<int64_t>& freq) {
  std::vector<int64_t> out;
  for (const auto& g : plan.groups) {
    int64_t n = 0;
    for (int e : g.members) n += freq[static_cast<size_t>(e)];
    out.push_back(n);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  moe::comm::MpiSession mpi(&argc, &argv);
  return moe::run_or_die([&]() -> int {
    CLI::App app{"moe-prune: prune and merge the experts of an MoE checkpoint for a task"};
    moe::model::PruneOptions o;
    std::string method = "merge";
    bool eval = false;
    std::string eval_split;
    int traffic_ranks = 0;
    app.add_option("--checkpoint", o.checkpoint, "checkpoint root or step directory")->required();
    app.add_option("--task-data", o.task_data, "HDF5 token file of the task (moe-data)")
        ->required();
    app.add_option("--target-experts", o.target, "experts per MoE layer after pruning (E')")
        ->required()
        ->check(CLI::Range(1, 1 << 20));
    app.add_option("--output", o.output, "checkpoint root to write")->required();
    app.add_option("--method", method, "merge | merge-noalign | frequency")
        ->check(CLI::IsMember({"merge", "merge-noalign", "frequency"}));
    app.add_option("--layers", o.layers,
                   "blocks to prune, comma-separated (default: every MoE block)")
        ->delimiter(',')
        ->check(CLI::Range(0, 1 << 20));
    app.add_option("--seed", o.seed, "seed of the task windows and of k-means");
    app.add_option("--tokens", o.tokens, "task tokens to profile")->check(CLI::Range(1, 1 << 26));
    app.add_option("--split", o.split, "split of the task file")
        ->check(CLI::IsMember({"train", "val"}));
    app.add_option("--decode-tokens", o.decode_tokens,
                   "tokens per decode step (concurrent sequences) for the traffic report")
        ->check(CLI::Range(1, 1 << 20));
    app.add_option("--traffic-ranks", traffic_ranks,
                   "largest rank count of the traffic report (default: this run's)")
        ->check(CLI::Range(1, 1 << 20));
    app.add_flag("--eval", eval, "also report the pruned model's task loss (needs E' >= ranks)");
    app.add_option("--eval-split", eval_split,
                   "split of the task file for --eval (default: --split, the profiled windows)")
        ->check(CLI::IsMember({"train", "val"}));
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      if (e.get_exit_code() == 0) return app.exit(e);
      throw moe::Error(moe::ErrorKind::kConfig, cat("moe-prune: ", e.what()));
    }
    o.method = moe::model::parse_prune_method(method);
    moe::comm::Communicator world = moe::comm::Communicator::world();
    moe::log::init(world.rank(), world.size(), "warn");
    moe::ThreadPolicy threads;
    threads.apply(world.size());

    const moe::model::PruneReport r = moe::model::prune_checkpoint(o, world);
    const moe::Config config = moe::Config::parse(moe::checkpoint::read_config(o.checkpoint),
                                                  o.checkpoint + " (stored config)");
    // Expert counts per MoE layer before and after: "8" when every layer has 8, else "8,4".
    auto counts = [&](bool after) {
      std::vector<int> c;
      for (size_t i = 0; i < r.plans.size(); ++i)
        c.push_back(static_cast<int>(after ? r.plans[i].groups.size() : r.frequency[i].size()));
      std::string s = cat(c[0]);
      if (std::any_of(c.begin(), c.end(), [&](int x) { return x != c[0]; })) {
        s.clear();
        for (int x : c) s += cat(s.empty() ? "" : ",", x);
      }
      return std::make_pair(s, *std::min_element(c.begin(), c.end()));
    };
    const auto [before_experts, before_min] = counts(false);
    const auto [after_experts, after_min] = counts(true);
    (void)before_min;
    const int k = static_cast<int>(config.get_int("model.moe.top_k"));
    const int64_t d = config.get_int("model.d_model");
    double before_loss = r.task_loss, after_loss = 0;
    moe::model::PruneOptions eval_options = o;
    if (!eval_split.empty()) eval_options.split = eval_split;
    const bool do_eval = eval && after_min >= world.size();
    if (eval && eval_options.split != o.split)
      before_loss = moe::model::task_loss(o.checkpoint, eval_options, world);
    if (do_eval) after_loss = moe::model::task_loss(r.written, eval_options, world);
    if (world.rank() != 0) return 0;

    std::printf("moe-prune: %s, %s -> %s experts in %s of %zu MoE layer(s), %lld task tokens\n",
                moe::model::prune_method_name(o.method), before_experts.c_str(),
                after_experts.c_str(), o.layers.empty() ? "each" : "blocks listed by --layers",
                r.plans.size(), static_cast<long long>(r.tokens));
    for (size_t i = 0; i < r.plans.size(); ++i) {
      std::string freq;
      for (int64_t c : r.frequency[i]) freq += cat(freq.empty() ? "" : " ", c);
      std::printf("layer %d: routed slots per expert [%s]\n  new experts (old ids): %s\n",
                  r.plans[i].layer, freq.c_str(), group_list(r.plans[i]).c_str());
    }
    // Traffic per decode step over all MoE layers, with the tokens on rank 0.
    std::printf(
        "All2All per decode step (%lld token(s) on rank 0, k %d, d %lld, %zu MoE layer(s); "
        "dispatch + combine):\n",
        static_cast<long long>(o.decode_tokens), k, static_cast<long long>(d), r.plans.size());
    std::printf("  %-7s %7s %6s %9s %12s %14s\n", "model", "experts", "ranks", "messages", "bytes",
                "remote bytes");
    for (int ranks = traffic_ranks > 0 ? traffic_ranks : world.size(); ranks >= 1;
         ranks = ranks > 1 ? ranks / 2 : 0)
      for (int after = 0; after < 2; ++after) {
        double bytes = 0, remote = 0;
        int messages = 0, holders = 0;
        for (size_t i = 0; i < r.plans.size(); ++i) {
          const auto t = moe::model::decode_traffic(
              o.decode_tokens, k, d, ranks,
              after ? merged_frequency(r.plans[i], r.frequency[i]) : r.frequency[i]);
          bytes += t.bytes_all;
          remote += t.bytes_remote;
          messages += t.messages;
          holders = std::max(holders, t.ranks_with_experts);
        }
        std::printf("  %-7s %7s %6d %9d %12.0f %14.0f\n", after ? "after" : "before",
                    (after ? after_experts : before_experts).c_str(), holders, messages, bytes,
                    remote);
      }
    std::printf(
        "(ranks: ranks holding experts, at most the expert count; remote bytes: expected "
        "with the task's routing)\n");
    const std::string on = eval && eval_options.split != o.split
                               ? cat(" (", eval_options.split, " split)")
                               : std::string();
    std::printf("task loss before%s: %.6f\n", on.c_str(), before_loss);
    if (do_eval)
      std::printf("task loss after%s: %.6f\n", on.c_str(), after_loss);
    else if (eval)
      std::printf(
          "task loss after: not evaluated (%d experts cannot cover %d ranks; run "
          "moe-prune --eval on at most %d ranks)\n",
          after_min, world.size(), after_min);
    std::printf("wrote %s\n", r.written.c_str());
    return 0;
  });
}
