#include "model/generate.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/model_checkpoint.hpp"
#include "runtime/data.hpp"
#include "runtime/error.hpp"

namespace moe::model {

int32_t sample(ConstView logits, const SampleOptions& o, std::mt19937_64& rng) {
  const int64_t V = logits.cols;
  const float* l = logits.row(0);
  if (o.temperature <= 0.0) return static_cast<int32_t>(std::max_element(l, l + V) - l);
  // Candidates by descending logit (ties by id), cut by top-k, softmax at the temperature, then
  // cut by top-p.
  std::vector<int32_t> ids(static_cast<size_t>(V));
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
  if (o.top_k > 0 && o.top_k < V) ids.resize(static_cast<size_t>(o.top_k));
  std::vector<double> p(ids.size());
  const double top = l[ids[0]];
  double z = 0;
  for (size_t i = 0; i < ids.size(); ++i) z += p[i] = std::exp((l[ids[i]] - top) / o.temperature);
  size_t keep = ids.size();
  if (o.top_p < 1.0) {
    double acc = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      acc += p[i] / z;
      if (acc >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double mass = std::accumulate(p.begin(), p.begin() + static_cast<int64_t>(keep), 0.0);
  double u = std::uniform_real_distribution<double>(0.0, mass)(rng);
  for (size_t i = 0; i < keep; ++i) {
    u -= p[i];
    if (u <= 0) return ids[i];
  }
  return ids[keep - 1];
}

std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              int64_t max_new, int64_t window, const SampleOptions& options,
                              const comm::Communicator& comm,
                              const std::function<bool(const std::vector<int32_t>&)>& stop) {
  const bool root = comm.rank() == 0;
  if (root && prompt.empty())
    throw Error(ErrorKind::kConfig, "generate: the prompt encodes to no tokens");
  std::vector<int32_t> seq = prompt, out;
  std::mt19937_64 rng(options.seed);
  for (int64_t i = 0; i < max_new; ++i) {
    // Rank 0 feeds its sequence (the last `window` tokens); the others feed nothing.
    const int64_t len = root ? std::min<int64_t>(window, static_cast<int64_t>(seq.size())) : 0;
    std::span<const int32_t> ids;
    if (root)
      ids = std::span<const int32_t>(seq.data() + seq.size() - len, static_cast<size_t>(len));
    ConstView logits = model.last_logits(ids, root ? 1 : 0, len);
    int go = 1;
    if (root) {
      const int32_t next = sample(logits, options, rng);
      seq.push_back(next);
      out.push_back(next);
      if (stop && stop(out)) go = 0;
    }
    comm.broadcast(&go, 1, 0, "generate continue");
    if (!go) break;
  }
  return out;
}

LoadedModel load_for_inference(const std::string& checkpoint_dir, const std::string& data_override,
                               const comm::Communicator& comm) {
  // Every rank reads the stored config and the tokenizer; all agree before the model exists.
  LoadedModel out;
  std::string error;
  TokenFileInfo info;
  try {
    out.config =
        Config::parse(checkpoint::read_config(checkpoint_dir), checkpoint_dir + " (stored config)");
    const std::string data =
        data_override.empty() ? out.config.get_string("data.path") : data_override;
    info = read_token_file_info(data);
    out.tokenizer = load_tokenizer(data);
  } catch (const Error& e) {
    error = e.message();
  }
  comm.agree(error, ErrorKind::kData, "load checkpoint config");
  const ModelConfig mc = ModelConfig::from(out.config, info.vocab_size);
  if (mc.n_moe_layers() > 0 && mc.moe.router == RouterKind::kExpertChoice)
    throw Error(ErrorKind::kConfig,
                cat(checkpoint_dir, " was trained with model.moe.router = expert_choice, which ",
                    "picks each expert's tokens from the whole batch and so cannot decode one ",
                    "token at a time; generation and serving need a topk or topk_bias model"));
  if (mc.moe.router == RouterKind::kSingleGate)
    throw Error(ErrorKind::kConfig,
                cat(checkpoint_dir, " was trained with model.moe.router = single_gate, a ",
                    "different model class (model/single_gate.hpp) that moe-generate does not ",
                    "load yet; score it with moe-train's evaluation instead"));
  out.model = std::make_unique<Transformer>(mc, comm, 0);
  Transformer& model = *out.model;

  CheckpointEntries entries = checkpoint_entries(model, {});  // values only
  out.meta = checkpoint::load(checkpoint_dir, entries.dense, entries.experts, comm);
  return out;
}

}  // namespace moe::model
