// moe-bench data: TokenDataset batch read throughput (random windows of seq_len + 1 tokens).
// Reads its settings from the config (data.path, data.split, train.seq_len, train.global_batch,
// train.seed): `moe-bench data --config cfg.yaml --set train.seq_len=512 [--json]`.
// Under mpirun each rank reads its share of every global batch; the table shows per-rank and
// aggregate tokens/s.
#include <cstdio>

#include "comm/communicator.hpp"
#include "examples/bench/bench.hpp"
#include "runtime/data.hpp"
#include "runtime/run.hpp"

namespace moe::bench {
namespace {

int bench_data(const std::vector<std::string>& argv) {
  std::vector<std::string> rest;
  Config config = config_from_args(argv, &rest);
  Args args(rest);
  comm::Communicator world = comm::Communicator::world();
  Run run = start_run(config, world.rank(), world.size(), "moe-bench data");
  const int64_t seq_len = config.get_int("train.seq_len");
  const int64_t global_batch = config.get_int("train.global_batch");
  const uint64_t seed = static_cast<uint64_t>(config.get_int("train.seed"));

  // Open on every rank, then agree: a bad file fails every rank with one message.
  std::string error;
  std::unique_ptr<TokenDataset> data;
  try {
    data = std::make_unique<TokenDataset>(config.get_string("data.path"),
                                          config.get_string("data.split"), seq_len);
  } catch (const Error& e) {
    error = e.message();
  }
  world.agree(error, ErrorKind::kData, "open dataset");
  if (global_batch % world.size() != 0)
    throw Error(ErrorKind::kConfig, cat("train.global_batch ", global_batch,
                                        " is not divisible by ", world.size(), " ranks"));
  const int64_t per_rank = global_batch / world.size();
  std::vector<int32_t> batch(static_cast<size_t>(per_rank * (seq_len + 1)));
  int64_t step = 0;
  auto read_one = [&] {
    data->read_rank_batch(seed, step++, global_batch, world.rank(), world.size(), batch.data());
  };
  world.barrier();
  double t = median_time(read_one, 5, 0.2);
  double rank_tps = double(per_rank) * double(seq_len + 1) / t;
  double total_tps = world.sum(rank_tps);
  if (world.rank() == 0) {
    std::printf("data: %s (%s, %lld tokens), seq_len %lld, global batch %lld windows, %d rank(s)\n",
                config.get_string("data.path").c_str(), config.get_string("data.split").c_str(),
                static_cast<long long>(data->n_tokens()), static_cast<long long>(seq_len),
                static_cast<long long>(global_batch), world.size());
    std::printf("%-32s %14s\n", "", "tokens/s");
    std::printf("%-32s %14.3e\n", "per rank (rank 0)", rank_tps);
    std::printf("%-32s %14.3e\n", "aggregate over ranks", total_tps);
    std::printf("%-32s %14.3f\n", "ms per rank batch", t * 1e3);
    if (args.flag("--json")) {
      nlohmann::json out = {{"bench", "data"},          {"ranks", world.size()},
                            {"seq_len", seq_len},       {"global_batch", global_batch},
                            {"seconds_per_batch", t},   {"rank_tokens_per_s", rank_tps},
                            {"tokens_per_s", total_tps}};
      std::printf("%s\n", out.dump().c_str());
    }
  }
  return 0;
}

}  // namespace
MOE_BENCH("data", "TokenDataset random-window batch read tokens/s (uses --config/--set)",
          bench_data);
}  // namespace moe::bench
