// moe-train: train an MoE Transformer on an HDF5 token file.
//   mpirun -np N build/bin/moe-train --config cfg.yaml [--set key=value ...]
//          [--metrics FILE] [--resume DIR] [--stop-after N]
// SIGTERM or SIGUSR1 (e.g. `sbatch --signal=B:USR1@60`, forwarded by the batch script) stops
// every rank after the same step with a checkpoint and exit code 0.
#include <cstdlib>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "model/train.hpp"
#include "runtime/error.hpp"
#include "runtime/run.hpp"

int main(int argc, char** argv) {
  // SIGTERM / SIGUSR1 from here on end the run after a checkpoint instead of killing it.
  moe::model::install_stop_signal_handlers();
  moe::comm::MpiSession mpi(&argc, &argv);
  return moe::run_or_die([&]() -> int {
    std::vector<std::string> rest;
    moe::Config config =
        moe::config_from_args(std::vector<std::string>(argv + 1, argv + argc), &rest);
    moe::model::TrainOptions options;
    for (size_t i = 0; i < rest.size(); ++i) {
      const std::string& a = rest[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= rest.size())
          throw moe::Error(moe::ErrorKind::kConfig, moe::cat("moe-train: ", a, " needs a value"));
        return rest[++i];
      };
      if (a == "--metrics") {
        options.metrics_path = value();
      } else if (a == "--resume") {
        options.resume = value();
      } else if (a == "--stop-after") {
        std::string v = value();
        char* end = nullptr;
        options.stop_after = std::strtoll(v.c_str(), &end, 10);
        if (*end || options.stop_after < 1)
          throw moe::Error(
              moe::ErrorKind::kConfig,
              moe::cat("moe-train: --stop-after expects a positive integer, got '", v, "'"));
      } else if (a == "--help" || a == "-h") {
        std::printf(
            "usage: moe-train --config FILE [--set key=value ...] [--metrics FILE]\n"
            "                 [--resume DIR] [--stop-after N]\n");
        return 0;
      } else {
        throw moe::Error(moe::ErrorKind::kConfig,
                         moe::cat("moe-train: unknown argument '", a, "' (see --help)"));
      }
    }
    moe::comm::Communicator world = moe::comm::Communicator::world();
    moe::model::train(config, options, world);
    return 0;
  });
}
