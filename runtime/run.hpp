// File: run.hpp — what every program does at start-up with its configuration.
//
// start_run(): sets the log rank and level, applies the thread policy, and on rank 0 prints the
// resolved configuration once and stores it as <run.dir>/config.yaml beside the run's
// metrics.jsonl. Every rank has already parsed and validated the same config (Config::load is
// pure), so a bad config fails identically everywhere before the first collective.
#pragma once

#include <string>
#include <vector>

#include "runtime/config.hpp"
#include "runtime/log.hpp"
#include "runtime/threads.hpp"

namespace moe {

struct Run {
  std::string dir;
  ThreadPolicy threads;
  MetricsWriter metrics;  // open on rank 0 when run.metrics is true
};

// Collective over MPI_COMM_WORLD when MPI is initialised (finds the ranks sharing the node).
Run start_run(const Config& config, int rank, int world_size, const std::string& program);

// Parses "--config FILE" and repeated "--set key=value" from argv (other arguments are left
// alone and returned), then loads the config. Errors are kConfig and name the flag.
Config config_from_args(const std::vector<std::string>& args, std::vector<std::string>* rest);

}  // namespace moe
