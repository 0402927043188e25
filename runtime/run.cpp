#include "runtime/run.hpp"

#include <mpi.h>

#include <filesystem>
#include <fstream>

namespace moe {

Run start_run(const Config& config, int rank, int world_size, const std::string& program) {
  log::init(rank, world_size, config.get_string("log.level"));
  Run run;
  run.dir = config.get_string("run.dir");
  run.threads.omp_threads = static_cast<int>(config.get_int("runtime.omp_threads"));
  run.threads.blis_threads = static_cast<int>(config.get_int("runtime.blis_threads"));
  // Ranks sharing this node's cores split them (collective over MPI_COMM_WORLD when MPI runs).
  int ranks_on_node = 1, initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, &ranks_on_node);
    MPI_Comm_free(&node);
  }
  run.threads.apply(ranks_on_node);
  if (rank == 0) {
    std::error_code ec;
    std::filesystem::create_directories(run.dir, ec);
    if (ec)
      throw Error(ErrorKind::kConfig,
                  cat("run.dir '", run.dir, "': cannot create: ", ec.message()));
    std::string yaml = config.to_yaml();
    log::info0(program, ": ", world_size, " rank(s); ", run.threads.describe());
    log::info0("resolved configuration (stored in ", run.dir, "/config.yaml):\n", yaml);
    std::ofstream out(run.dir + "/config.yaml");
    out << "# resolved configuration of " << program << " (" << world_size << " ranks)\n" << yaml;
    if (!out) throw Error(ErrorKind::kConfig, cat(run.dir, "/config.yaml: cannot write"));
  }
  run.metrics =
      MetricsWriter(run.dir + "/metrics.jsonl", rank == 0 && config.get_bool("run.metrics"));
  return run;
}

Config config_from_args(const std::vector<std::string>& args, std::vector<std::string>* rest) {
  std::string path;
  std::vector<std::string> sets;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&](const char* flag) -> std::string {
      if (i + 1 >= args.size()) throw Error(ErrorKind::kConfig, cat(flag, " needs a value"));
      return args[++i];
    };
    if (a == "--config")
      path = value("--config");
    else if (a.rfind("--config=", 0) == 0)
      path = a.substr(9);
    else if (a == "--set")
      sets.push_back(value("--set"));
    else if (a.rfind("--set=", 0) == 0)
      sets.push_back(a.substr(6));
    else if (rest)
      rest->push_back(a);
  }
  return Config::load(path, sets);
}

}  // namespace moe
