// moe-bench: performance figures as ratios against references measured in the same run.
//   moe-bench gemm [--json]          BLIS sgemm on MoE expert shapes vs this CPU's fp32 peak
//   moe-bench data [--json] ...      TokenDataset random-window read throughput
// Multi-rank subcommands run under mpirun. `moe-bench --help` lists them all.
#include <cstdio>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "examples/bench/bench.hpp"
#include "runtime/error.hpp"

int main(int argc, char** argv) {
  moe::comm::MpiSession mpi(&argc, &argv);
  return moe::run_or_die([&]() -> int {
    auto& cmds = moe::bench::registry();
    std::string name = argc > 1 ? argv[1] : "--help";
    if (name == "--help" || name == "-h" || name == "help") {
      std::printf("usage: moe-bench <command> [options] [--json]\n\ncommands:\n");
      for (const auto& c : cmds) std::printf("  %-10s %s\n", c.name.c_str(), c.help.c_str());
      return argc > 1 ? 0 : 1;
    }
    for (const auto& c : cmds)
      if (c.name == name) return c.main(std::vector<std::string>(argv + 2, argv + argc));
    throw moe::Error(moe::ErrorKind::kConfig,
                     moe::cat("moe-bench: unknown command '", name, "' (see moe-bench --help)"));
  });
}
