// moe-bench weights: what --weights bf16 costs in quality on a trained checkpoint.
//   mpirun -np 2 moe-bench weights --checkpoint DIR [--data FILE] [--split val] [--windows 32]
//                                  [--seed 0] [--json]
// Loads the checkpoint (model/generate.hpp load_for_inference), scores `windows` windows of
// train.seq_len tokens of the token file's split (the run's data.path unless --data) in fp32,
// then rounds the model's inference weights to bf16 (Transformer::round_inference_weights, as
// moe-serve / moe-generate --weights bf16) and scores the same windows again. Printed, both in
// this run:
//   loss_fp32, loss_bf16     mean cross-entropy per target token (nats), and their difference
//   logits_max_abs_diff      max |bf16 - fp32| over the last position's logits of each window
//                            (a token whose router picks another expert stands out here)
//   logits_mean_abs_diff     mean |bf16 - fp32| over the same logits
//   logits_max_abs           max |fp32 logit| there (the scale of the difference)
//   top1_agreement           fraction of those positions whose argmax is the same
// Collective over the world; every rank scores its share of the windows.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "examples/bench/bench.hpp"
#include "model/generate.hpp"
#include "model/transformer.hpp"
#include "runtime/data.hpp"
#include "runtime/threads.hpp"

namespace moe::bench {
namespace {

struct Scored {
  double loss = 0;            // mean per target token, all ranks
  std::vector<float> logits;  // [this rank's windows, V] last-position logits
};

// Scores windows [first, first + count) of `data` (this rank's share of n): the summed loss
// over all ranks divided by the global target count, and each window's last-position logits.
Scored score(model::Transformer& model, const TokenDataset& data, uint64_t seed, int64_t first,
             int64_t count, int64_t n, const comm::Communicator& world) {
  const int64_t S = data.seq_len(), V = model.config().vocab_size;
  std::vector<int32_t> windows(static_cast<size_t>(std::max<int64_t>(count, 1) * (S + 1)));
  if (count > 0) data.read_windows(seed, 0, first, count, windows.data());
  Scored out;
  out.loss = world.sum(
      model.forward(std::span<const int32_t>(windows.data(), static_cast<size_t>(count * (S + 1))),
                    count, S, static_cast<double>(n * S)));
  std::vector<int32_t> inputs;  // each window's first S tokens
  for (int64_t w = 0; w < count; ++w)
    inputs.insert(inputs.end(), windows.begin() + w * (S + 1), windows.begin() + w * (S + 1) + S);
  ConstView l = model.last_logits(inputs, count, S);
  out.logits.assign(l.data, l.data + count * V);
  return out;
}

int bench_weights(const std::vector<std::string>& argv) {
  Args args(argv);
  comm::Communicator world = comm::Communicator::world();
  const int P = world.size(), rank = world.rank();
  ThreadPolicy policy;
  policy.omp_threads = static_cast<int>(args.get_int("--threads", 0));
  policy.apply(P);
  const std::string ckpt = args.get("--checkpoint", "");
  if (ckpt.empty()) throw Error(ErrorKind::kConfig, "weights needs --checkpoint DIR");
  const int64_t n = args.get_int("--windows", 32);
  if (n < P) throw Error(ErrorKind::kConfig, cat("weights needs --windows >= ranks (", P, ")"));
  const std::string split = args.get("--split", "val");
  const auto seed = static_cast<uint64_t>(args.get_int("--seed", 0));

  model::LoadedModel loaded = model::load_for_inference(ckpt, args.get("--data", ""), world);
  model::Transformer& model = *loaded.model;
  const std::string path = args.get("--data", loaded.config.get_string("data.path"));
  const int64_t S = loaded.config.get_int("train.seq_len"), V = model.config().vocab_size;
  std::unique_ptr<TokenDataset> data;
  std::string error;
  try {
    data = std::make_unique<TokenDataset>(path, split, S, V);
  } catch (const Error& e) {
    error = e.message();
  }
  world.agree(error, ErrorKind::kData, "weights: open data");

  const int64_t first = n * rank / P, count = n * (rank + 1) / P - first;
  const Scored fp32 = score(model, *data, seed, first, count, n, world);
  model.round_inference_weights(WeightType::kBf16);
  const Scored bf16 = score(model, *data, seed, first, count, n, world);

  double diff = 0, sum_diff = 0, scale = 0, agree = 0;
  for (int64_t w = 0; w < count; ++w) {
    const float* a = fp32.logits.data() + w * V;
    const float* b = bf16.logits.data() + w * V;
    for (int64_t j = 0; j < V; ++j) {
      diff = std::max(diff, double(std::abs(a[j] - b[j])));
      sum_diff += std::abs(double(a[j]) - b[j]);
      scale = std::max(scale, double(std::abs(a[j])));
    }
    agree += std::max_element(a, a + V) - a == std::max_element(b, b + V) - b;
  }
  diff = world.max(diff);
  const double mean_diff = world.sum(sum_diff) / double(n * V);
  scale = world.max(scale);
  agree = world.sum(agree) / double(n);
  if (rank != 0) return 0;
  std::printf("moe-bench weights: %d rank(s), %s, %lld %s windows of %lld tokens (%s)\n", P,
              ckpt.c_str(), (long long)n, split.c_str(), (long long)S, path.c_str());
  std::printf("loss fp32 %.6f  bf16 %.6f  (bf16 - fp32 %+.2e nats/token, %+.4f%%)\n", fp32.loss,
              bf16.loss, bf16.loss - fp32.loss, 100 * (bf16.loss - fp32.loss) / fp32.loss);
  std::printf(
      "last-position logits: |bf16 - fp32| max %.4g, mean %.3g (max |logit| %.4g); top-1 "
      "agreement %.4f\n",
      diff, mean_diff, scale, agree);
  if (args.flag("--json")) {
    nlohmann::json out = {{"bench", "weights"},
                          {"ranks", P},
                          {"checkpoint", ckpt},
                          {"windows", n},
                          {"split", split},
                          {"seq_len", S},
                          {"loss_fp32", fp32.loss},
                          {"loss_bf16", bf16.loss},
                          {"logits_max_abs_diff", diff},
                          {"logits_mean_abs_diff", mean_diff},
                          {"logits_max_abs", scale},
                          {"top1_agreement", agree}};
    std::printf("%s\n", out.dump().c_str());
  }
  return 0;
}

}  // namespace
MOE_BENCH("weights",
          "quality cost of --weights bf16 on a checkpoint: loss and logits, fp32 vs bf16",
          bench_weights);
}  // namespace moe::bench
