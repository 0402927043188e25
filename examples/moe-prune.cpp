// moe-prune: task-aware offline pruning and merging of the experts of a trained MoE checkpoint.
//   mpirun -np N build/bin/moe-prune --checkpoint IN --task-data task.h5 --target-experts E'
//          --output OUT [--method merge|merge-noalign|frequency] [--seed S] [--tokens T]
//          [--split train|val] [--decode-tokens n] [--eval]
// Profiles the experts' router logits over the task tokens, clusters them into E' groups,
// merges each group (model/prune.hpp) and writes a checkpoint with E' experts per MoE layer
// that trains (--resume), serves and reshards like any other. Prints the All2All traffic per
// decode step before and after; --eval also prints the task loss of the pruned model.
#include <CLI/CLI.hpp>

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
    app.add_option("--checkpoint", o.checkpoint, "checkpoint root or step directory")->required();
    app.add_option("--task-data", o.task_data, "HDF5 token file of the task (moe-data)")
        ->required();
    app.add_option("--target-experts", o.target, "experts per MoE layer after pruning (E')")
        ->required()
        ->check(CLI::Range(1, 1 << 20));
    app.add_option("--output", o.output, "checkpoint root to write")->required();
    app.add_option("--method", method, "merge | merge-noalign | frequency")
        ->check(CLI::IsMember({"merge", "merge-noalign", "frequency"}));
    app.add_option("--seed", o.seed, "seed of the task windows and of k-means");
    app.add_option("--tokens", o.tokens, "task tokens to profile")->check(CLI::Range(1, 1 << 26));
    app.add_option("--split", o.split, "split of the task file")
        ->check(CLI::IsMember({"train", "val"}));
    app.add_option("--decode-tokens", o.decode_tokens,
                   "tokens per decode step (concurrent sequences) for the traffic report")
        ->check(CLI::Range(1, 1 << 20));
    app.add_flag("--eval", eval, "also report the pruned model's task loss (needs E' >= ranks)");
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
    const int E = static_cast<int>(r.frequency.at(0).size());
    const int k = static_cast<int>(config.get_int("model.moe.top_k"));
    const int64_t d = config.get_int("model.d_model");
    double after_loss = 0;
    const bool do_eval = eval && o.target >= world.size();
    if (do_eval) after_loss = moe::model::task_loss(r.written, o, world);
    if (world.rank() != 0) return 0;

    std::printf("moe-prune: %s, %d -> %d experts in each of %zu MoE layer(s), %lld task tokens\n",
                moe::model::prune_method_name(o.method), E, o.target, r.plans.size(),
                static_cast<long long>(r.tokens));
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
    for (int ranks = world.size(); ranks >= 1; ranks = ranks > 1 ? ranks / 2 : 0)
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
          holders = t.ranks_with_experts;
        }
        std::printf("  %-7s %7d %6d %9d %12.0f %14.0f\n", after ? "after" : "before",
                    after ? o.target : E, holders, messages, bytes, remote);
      }
    std::printf(
        "(ranks: ranks holding experts, at most the expert count; remote bytes: expected "
        "with the task's routing)\n");
    std::printf("task loss before: %.6f\n", r.task_loss);
    if (do_eval)
      std::printf("task loss after: %.6f\n", after_loss);
    else if (eval)
      std::printf(
          "task loss after: not evaluated (%d experts cannot cover %d ranks; run "
          "moe-prune --eval on at most %d ranks)\n",
          o.target, world.size(), o.target);
    std::printf("wrote %s\n", r.written.c_str());
    return 0;
  });
}
