#include "runtime/config.hpp"

// yaml-cpp 0.7's node templates trip GCC 12's -Wdangling-pointer inside its own headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdangling-pointer"
#include <yaml-cpp/yaml.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "runtime/error.hpp"

namespace moe {

namespace {

using T = ConfigType;

// The schema. Keep it sorted by section; the README's table is generated from it
// (`moe-config schema`).
const std::vector<ConfigKey> kSchema = {
    {"run.dir",
     T::kString,
     "runs/default",
     0,
     0,
     {},
     "directory for this run's outputs: resolved config, metrics.jsonl, checkpoints"},
    {"run.metrics",
     T::kBool,
     "true",
     0,
     0,
     {},
     "write JSON-lines metrics to <run.dir>/metrics.jsonl"},
    {"log.level",
     T::kString,
     "info",
     0,
     0,
     {"debug", "info", "warn", "error"},
     "lowest level printed; errors always go to stderr"},
    {"log.every", T::kInt, "10", 1, 1e9, {}, "print the rank-0 progress line every N steps"},
    {"runtime.omp_threads",
     T::kInt,
     "0",
     0,
     1024,
     {},
     "OpenMP threads per rank; 0 = OMP_NUM_THREADS, else the node's cores / ranks on the node"},
    {"runtime.blis_threads",
     T::kInt,
     "0",
     0,
     1024,
     {},
     "BLIS threads for a GEMM called outside OpenMP loops; 0 = runtime.omp_threads"},
    {"data.path",
     T::kString,
     "data/kjv.h5",
     0,
     0,
     {},
     "HDF5 token file written by `moe-data build`"},
    {"data.split", T::kString, "train", 0, 0, {"train", "val"}, "which split training reads"},
    {"model.vocab_size",
     T::kInt,
     "0",
     0,
     1 << 24,
     {},
     "vocabulary size; 0 = take it from the data file"},
    {"model.d_model", T::kInt, "256", 8, 1 << 16, {}, "model width d"},
    {"model.n_layers", T::kInt, "4", 1, 1024, {}, "Transformer blocks"},
    {"model.n_heads", T::kInt, "4", 1, 1024, {}, "attention heads; must divide model.d_model"},
    {"model.d_ff", T::kInt, "1024", 1, 1 << 20, {}, "hidden width of the dense FFN blocks"},
    {"model.activation",
     T::kString,
     "gelu",
     0,
     0,
     {"gelu", "swiglu"},
     "activation of the dense FFN blocks"},
    {"model.tie_embeddings",
     T::kBool,
     "true",
     0,
     0,
     {},
     "share the token embedding with the LM head"},
    {"model.norm_eps", T::kFloat, "1e-5", 1e-12, 1, {}, "RMSNorm epsilon"},
    {"model.rope_base", T::kFloat, "10000", 1, 1e9, {}, "rotary position embedding base"},
    {"model.moe.kind",
     T::kString,
     "ffn",
     0,
     0,
     {"ffn", "peer"},
     "ffn: MoE FFN layers (model.moe.*); peer: one PEER layer (model.peer.*), other blocks dense"},
    {"model.peer.n_sub_keys",
     T::kInt,
     "32",
     1,
     1 << 14,
     {},
     "PEER sub-keys per half n: n^2 single-neuron experts; >= world size"},
    {"model.peer.heads", T::kInt, "8", 1, 256, {}, "PEER retrieval heads (query networks)"},
    {"model.peer.top_k", T::kInt, "16", 1, 1024, {}, "PEER experts per head; <= n_sub_keys"},
    {"model.peer.d_key", T::kInt, "32", 2, 1 << 14, {}, "PEER query / product-key width (even)"},
    {"model.peer.batch_norm",
     T::kBool,
     "true",
     0,
     0,
     {},
     "batch-normalise PEER queries (global batch statistics; running statistics at inference)"},
    {"model.peer.layer",
     T::kInt,
     "-1",
     -1,
     1 << 20,
     {},
     "the block whose FFN is PEER; -1 = the middle block (n_layers / 2)"},
    {"model.peer.usage_window",
     T::kInt,
     "100",
     1,
     1 << 30,
     {},
     "steps over which peer_usage / peer_kl (metrics) count retrievals"},
    {"model.attention",
     T::kString,
     "mha",
     0,
     0,
     {"mha", "umoe"},
     "attention sub-layer: mha (causal multi-head) or umoe (token mixing then routed experts, "
     "model.umoe.*, experts from model.moe.*)"},
    {"model.moe.every_n_layers",
     T::kInt,
     "1",
     0,
     1024,
     {},
     "block l has an MoE FFN when (l + 1) % n == 0; 1 = every block, 0 = a dense model"},
    {"model.moe.router",
     T::kString,
     "topk",
     0,
     0,
     {"topk", "topk_bias", "expert_choice", "single_gate"},
     "router kind: topk (softmax top-k with load-balancing and z-losses); topk_bias (top-k "
     "selected by score + a balancing bias, no load-balancing loss); expert_choice (each expert "
     "takes its top-c tokens of the global batch; training and batched scoring only); "
     "single_gate (one gate per sequence picks one expert copy of the later blocks, "
     "model.single_gate.*)"},
    {"train.seq_len",
     T::kInt,
     "256",
     1,
     1 << 20,
     {},
     "tokens per training window (each window reads seq_len + 1 tokens)"},
    {"train.eval_every",
     T::kInt,
     "50",
     0,
     1e9,
     {},
     "evaluate the validation loss every N steps (and at the end); 0 = only at the end"},
    {"train.eval_batches",
     T::kInt,
     "4",
     1,
     1e6,
     {},
     "global batches of the fixed held-out validation set"},
    {"train.on_nonfinite",
     T::kString,
     "stop",
     0,
     0,
     {"stop", "skip"},
     "a NaN/Inf loss or gradient norm: stop with an error naming the step, or skip the update"},
    {"train.seed",
     T::kInt,
     "1234",
     0,
     9.0e15,
     {},
     "seed for weights and data order; same seed, same run on any rank count"},
    {"train.global_batch",
     T::kInt,
     "16",
     1,
     1 << 24,
     {},
     "sequences per optimiser step, over all ranks"},
    {"train.micro_batch",
     T::kInt,
     "4",
     1,
     1 << 20,
     {},
     "sequences per rank per forward/backward; global_batch / (micro_batch * ranks) = "
     "accumulation"},
    {"model.moe.num_experts",
     T::kInt,
     "8",
     1,
     1 << 20,
     {},
     "experts per MoE layer (global); the world size must not exceed it"},
    {"model.moe.layer_experts",
     T::kString,
     "",
     0,
     0,
     {},
     "experts of each MoE layer, comma-separated in block order (e.g. 32,8; one count per MoE "
     "block, each >= top_k and >= the world size); empty: every MoE layer has num_experts. "
     "moe-prune --layers writes it"},
    {"model.moe.top_k", T::kInt, "2", 1, 64, {}, "experts per token (slots); <= num_experts"},
    {"model.moe.d_ff", T::kInt, "2048", 1, 1 << 20, {}, "hidden width of each expert FFN"},
    {"model.moe.activation",
     T::kString,
     "gelu",
     0,
     0,
     {"gelu", "swiglu"},
     "expert FFN: gelu (exact erf GELU, W1 [d, d_ff]) or swiglu (gate and up [d, 2 d_ff])"},
    {"model.moe.renormalize",
     T::kBool,
     "true",
     0,
     0,
     {},
     "rescale each token's top-k router weights to sum to 1"},
    {"model.moe.aux_loss_coef",
     T::kFloat,
     "0.01",
     0,
     1000,
     {},
     "coefficient of the Switch/GShard load-balancing loss E * sum_i f_i P_i (global batch)"},
    {"model.moe.z_loss_coef",
     T::kFloat,
     "0.001",
     0,
     1000,
     {},
     "coefficient of the ST-MoE router z-loss mean(logsumexp(logits)^2) (global batch)"},
    {"model.moe.aux_loss_scope",
     T::kString,
     "global",
     0,
     0,
     {"global", "rank"},
     "load-balancing statistics over all ranks' tokens of a micro-step (global) or each rank's "
     "own micro-batch (rank: the same optimisation on any rank count under accumulation)"},
    {"model.moe.capacity_factor",
     T::kFloat,
     "0",
     0,
     1000,
     {},
     "0 = dropless; else each expert keeps at most ceil(C * top_k * tokens / experts) slots, "
     "dropping the lowest router weights; expert_choice: c = ceil(C * tokens / experts) tokens "
     "per expert (C = top_k when 0)"},
    {"model.moe.bias_update_rate",
     T::kFloat,
     "1e-3",
     0,
     1,
     {},
     "topk_bias: after each step b_i += rate * sign(mean load - load_i) (global batch load)"},
    {"model.moe.shared_experts",
     T::kInt,
     "0",
     0,
     64,
     {},
     "always-on experts of width d_ff per MoE layer, added to the routed output, replicated"},
    {"model.moe.pipeline_chunks",
     T::kInt,
     "1",
     1,
     64,
     {},
     "split each rank's tokens into chunks to overlap All2All with expert compute; 1 = off"},
    // Single-gate MoE (model/single_gate): model.moe.router = single_gate.
    {"model.single_gate.shared_layers",
     T::kInt,
     "1",
     1,
     1024,
     {},
     "blocks of the shared base branch; the experts copy the remaining n_layers - this"},
    {"model.single_gate.ensemble",
     T::kFloat,
     "0.5",
     0,
     1,
     {},
     "weight a of the base branch in p = a p_base + (1 - a) p_expert; 0 = the expert alone"},
    {"model.single_gate.exit_threshold",
     T::kFloat,
     "1",
     0,
     1,
     {},
     "inference: a sequence whose mean base max-probability exceeds this skips its expert"},
    {"model.single_gate.base_fraction",
     T::kFloat,
     "0.4",
     0,
     1,
     {},
     "share of train.steps for phase (a), the base model (0 with base_checkpoint)"},
    {"model.single_gate.gate_fraction",
     T::kFloat,
     "0.1",
     0,
     1,
     {},
     "share of train.steps for phase (d), the gate trained towards each sequence's best expert"},
    {"model.single_gate.kmeans_sequences",
     T::kInt,
     "256",
     1,
     1 << 24,
     {},
     "training sequences whose pooled base features K-means clusters in phase (b)"},
    {"model.single_gate.kmeans_iters", T::kInt, "10", 1, 10000, {}, "K-means (Lloyd) iterations"},
    {"model.single_gate.freeze_base",
     T::kBool,
     "true",
     0,
     0,
     {},
     "after phase (a) the embedding, shared blocks and base branch stay fixed, so the gate's "
     "K-means clusters stay valid; false: they keep training in phase (c)"},
    {"model.single_gate.base_checkpoint",
     T::kString,
     "",
     0,
     0,
     {},
     "start from this base model's checkpoint (a dense or single_gate run) and skip phase (a)"},
    {"model.moe.share_attention_ffn",
     T::kBool,
     "false",
     0,
     0,
     {},
     "with model.attention = umoe: the MoE FFN of each block runs the attention's experts (one "
     "set of weights, own router and shared experts)"},
    {"model.umoe.top_k", T::kInt, "2", 1, 64, {}, "UMoE attention: experts per token"},
    {"model.umoe.d_qk", T::kInt, "64", 2, 1 << 16, {}, "UMoE attention: query/key width (even)"},
    {"model.umoe.query_rank",
     T::kInt,
     "16",
     1,
     1 << 16,
     {},
     "UMoE attention: rank r of each expert's query correction rms(x W_a) W_b"},
    {"model.umoe.shared_experts",
     T::kInt,
     "1",
     0,
     16,
     {},
     "UMoE attention: always-on experts of width model.moe.d_ff, each with its own query"},
    {"model.umoe.renormalize",
     T::kBool,
     "false",
     0,
     0,
     {},
     "UMoE attention: renormalise the top-k router probabilities to sum to 1"},
    {"model.umoe.aux_loss_coef",
     T::kFloat,
     "1e-3",
     0,
     10,
     {},
     "UMoE attention router: sequence-level load-balancing loss coefficient (E sum_i f_i P_i "
     "per sequence, averaged over the global micro-batch's sequences)"},
    // Optimiser, schedule, checkpoints and gradient all-reduce (model/optim, runtime/checkpoint,
    // comm/allreduce).
    {"train.steps",
     T::kInt,
     "1000",
     1,
     1e12,
     {},
     "optimiser steps of the whole run; the cosine schedule ends here"},
    {"train.lr", T::kFloat, "3e-4", 0, 10, {}, "peak learning rate, reached after warmup"},
    {"train.min_lr",
     T::kFloat,
     "3e-5",
     0,
     10,
     {},
     "learning rate at the end of the cosine decay (train.steps)"},
    {"train.warmup_steps",
     T::kInt,
     "100",
     0,
     1e12,
     {},
     "steps of linear warmup from lr/warmup_steps to lr; 0 = none"},
    {"train.weight_decay",
     T::kFloat,
     "0.1",
     0,
     10,
     {},
     "AdamW decoupled weight decay; norms and biases never decay"},
    {"train.beta1", T::kFloat, "0.9", 0, 0.999999, {}, "AdamW first-moment decay"},
    {"train.beta2", T::kFloat, "0.95", 0, 0.999999, {}, "AdamW second-moment decay"},
    {"train.eps", T::kFloat, "1e-8", 1e-30, 1, {}, "AdamW denominator epsilon"},
    {"train.grad_clip",
     T::kFloat,
     "1.0",
     0,
     1e9,
     {},
     "clip gradients to this global L2 norm (all parameters, all ranks); 0 = off"},
    {"checkpoint.dir",
     T::kString,
     "",
     0,
     0,
     {},
     "checkpoint directory (step-N subdirectories and a latest pointer); empty = "
     "<run.dir>/checkpoints"},
    {"checkpoint.every",
     T::kInt,
     "0",
     0,
     1e12,
     {},
     "save a checkpoint every N optimiser steps (and at the end); 0 = only at the end"},
    {"checkpoint.keep",
     T::kInt,
     "3",
     1,
     1e6,
     {},
     "checkpoints kept on disk; older step directories are deleted after a save"},
    {"comm.bucket_mb",
     T::kFloat,
     "25",
     0.001,
     1e6,
     {},
     "size of a dense-gradient all-reduce bucket in MiB; buckets launch during backward"},
    {"comm.exchange",
     T::kString,
     "auto",
     0,
     0,
     {"auto", "alltoallv", "shared", "hierarchical"},
     "MoE token exchange: shared = one copy per row through node shared-memory windows (every "
     "rank on one node, model.moe.pipeline_chunks 1); alltoallv = one MPI_Alltoallv; "
     "hierarchical = within each node, then across nodes (same ranks per node, "
     "model.moe.pipeline_chunks 1); auto = shared if possible, else hierarchical on several "
     "nodes of several ranks, else alltoallv"},
    {"comm.rebalance.every",
     T::kInt,
     "0",
     0,
     1e9,
     {},
     "re-plan the expert placement every N optimiser steps from the moving average of each "
     "expert's load (greedy longest-processing-time), migrating weights and AdamW state "
     "point-to-point; 0 = off. Not with UMoE attention"},
    {"comm.rebalance.replicas",
     T::kInt,
     "0",
     0,
     4096,
     {},
     "extra instances of hot experts per MoE layer when re-planning (an expert is replicated "
     "while its share exceeds the mean rank load); replicas split the expert's tokens and sum "
     "their gradients. Needs dropless routing and model.moe.pipeline_chunks 1"},
    {"comm.rebalance.policy",
     T::kString,
     "lpt",
     0,
     0,
     {"lpt", "replicate"},
     "lpt = re-place all experts by load; replicate = keep every expert on its rank and only "
     "add replicas of hot experts"},
    {"comm.rebalance.ema_decay",
     T::kFloat,
     "0.9",
     0,
     0.999999,
     {},
     "decay of the per-expert load moving average (per optimiser step)"},
    {"comm.rebalance.min_gain",
     T::kFloat,
     "0.05",
     0,
     100,
     {},
     "re-place only when the predicted maximum rank load drops by at least this fraction"},
    {"comm.rebalance.max_experts_per_rank",
     T::kInt,
     "0",
     0,
     1 << 20,
     {},
     "most expert instances (replicas count) the planner puts on one rank per MoE layer, which "
     "bounds each rank's expert weights and AdamW state; 0 = 2 x ceil(E / P); below "
     "ceil(E / P) is an error"},
    {"comm.ranks_per_node",
     T::kInt,
     "0",
     0,
     1 << 20,
     {},
     "ranks per node for the MoE exchange: 0 = detect (MPI shared-memory domains); N > 0 = "
     "consecutive blocks of N ranks form a node (must divide the rank count), e.g. to run "
     "several nodes' layout on one machine"},
    {"bench.router_skew",
     T::kFloat,
     "0",
     0,
     1e6,
     {},
     "BENCHMARK KNOB: added to expert 0's selection score in the top-k routers (not to its "
     "weight; the maths stays exact); >= 1 sends one slot of every token to expert 0. 0 = off"},
};

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string suggestion(const std::string& key) {
  const ConfigKey* best = nullptr;
  size_t best_d = 4;  // suggest only close matches
  for (const auto& k : kSchema) {
    size_t d = edit_distance(key, k.key);
    // Also match the last component alone ("d_modle" under the wrong section).
    std::string tail = k.key.substr(k.key.rfind('.') + 1);
    std::string key_tail = key.substr(key.rfind('.') + 1);
    if (key_tail == tail) d = std::min<size_t>(d, 1);
    if (d < best_d) best = &k, best_d = d;
  }
  return best ? cat(" (did you mean '", best->key, "'?)") : std::string();
}

[[noreturn]] void config_error(const std::string& where, const std::string& what) {
  throw Error(ErrorKind::kConfig, cat(where, ": ", what));
}

std::string format_value(const ConfigValue& v) {
  if (auto* i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  if (auto* b = std::get_if<bool>(&v)) return *b ? "true" : "false";
  if (auto* d = std::get_if<double>(&v)) {
    std::ostringstream os;
    os.precision(10);
    os << *d;
    std::string s = os.str();
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
    return s;
  }
  const std::string& s = std::get<std::string>(v);
  YAML::Emitter e;
  e << s;
  return e.c_str();
}

std::string range_text(const ConfigKey& k) {
  if (!k.choices.empty()) {
    std::string s;
    for (const auto& c : k.choices) s += (s.empty() ? "" : " | ") + c;
    return s;
  }
  if (k.min == 0 && k.max == 0) return "";
  return cat("[",
             format_value(k.type == T::kInt ? ConfigValue(static_cast<int64_t>(k.min))
                                            : ConfigValue(k.min)),
             ", ",
             format_value(k.type == T::kInt ? ConfigValue(static_cast<int64_t>(k.max))
                                            : ConfigValue(k.max)),
             "]");
}

ConfigValue parse_value(const ConfigKey& k, const std::string& raw, const std::string& where) {
  std::string text = trim(raw);
  auto expect = [&](const char* what) -> ConfigValue {
    config_error(where, cat("key '", k.key, "' expects ", what, ", got '", text, "'"));
  };
  switch (k.type) {
    case T::kInt: {
      if (text.empty()) expect("an integer");
      errno = 0;
      char* end = nullptr;
      long long v = std::strtoll(text.c_str(), &end, 10);
      if (*end != '\0' || errno == ERANGE) expect("an integer");
      if (!(k.min == 0 && k.max == 0) && (v < k.min || v > k.max))
        config_error(where, cat("key '", k.key, "' = ", v, " is out of range ", range_text(k)));
      return static_cast<int64_t>(v);
    }
    case T::kFloat: {
      if (text.empty()) expect("a number");
      errno = 0;
      char* end = nullptr;
      double v = std::strtod(text.c_str(), &end);
      if (*end != '\0' || errno == ERANGE || !std::isfinite(v)) expect("a number");
      if (!(k.min == 0 && k.max == 0) && (v < k.min || v > k.max))
        config_error(where, cat("key '", k.key, "' = ", text, " is out of range ", range_text(k)));
      return v;
    }
    case T::kBool: {
      std::string l = text;
      std::transform(l.begin(), l.end(), l.begin(), ::tolower);
      if (l == "true" || l == "yes" || l == "on") return true;
      if (l == "false" || l == "no" || l == "off") return false;
      return expect("true or false");
    }
    case T::kString: {
      if (!k.choices.empty() &&
          std::find(k.choices.begin(), k.choices.end(), text) == k.choices.end())
        config_error(where, cat("key '", k.key, "' = '", text, "' is not one of ", range_text(k)));
      return text;
    }
  }
  return text;
}

// Flattens a YAML mapping into dotted keys, keeping each scalar's line for errors.
void flatten(const YAML::Node& node, const std::string& prefix, const std::string& source,
             std::vector<std::tuple<std::string, std::string, std::string>>& out) {
  for (auto it = node.begin(); it != node.end(); ++it) {
    std::string name = it->first.as<std::string>();
    std::string key = prefix.empty() ? name : prefix + "." + name;
    const YAML::Node& v = it->second;
    std::string where = cat(source, ":", it->first.Mark().line + 1);
    if (v.IsMap()) {
      flatten(v, key, source, out);
    } else if (v.IsScalar()) {
      out.emplace_back(key, v.Scalar(), where);
    } else if (v.IsNull()) {
      out.emplace_back(key, "", where);
    } else {
      const ConfigKey* k = find_config_key(key);
      if (!k) config_error(where, cat("unknown key '", key, "'", suggestion(key)));
      config_error(where,
                   cat("key '", key, "' expects ", config_type_name(k->type), ", got a list"));
    }
  }
}

}  // namespace

const std::vector<ConfigKey>& config_schema() {
  return kSchema;
}

const ConfigKey* find_config_key(const std::string& key) {
  for (const auto& k : kSchema)
    if (k.key == key) return &k;
  return nullptr;
}

const char* config_type_name(ConfigType type) {
  switch (type) {
    case T::kInt:
      return "an integer";
    case T::kFloat:
      return "a number";
    case T::kBool:
      return "true or false";
    case T::kString:
      return "a string";
  }
  return "?";
}

Config::Config() {
  for (const auto& k : kSchema)
    values_[k.key] = Entry{parse_value(k, k.default_value, "schema default"), "default"};
}

void Config::assign(const std::string& key, const std::string& text, const std::string& where) {
  const ConfigKey* k = find_config_key(key);
  if (!k) config_error(where, cat("unknown key '", key, "'", suggestion(key)));
  values_[key] = Entry{parse_value(*k, text, where), where};
}

Config Config::parse(const std::string& yaml_text, const std::string& source) {
  Config c;
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    config_error(cat(source, ":", e.mark.line + 1), cat("malformed YAML: ", e.msg));
  }
  if (root.IsNull()) return c;  // an empty file means all defaults
  if (!root.IsMap()) config_error(source, "the top level must be a mapping of keys");
  std::vector<std::tuple<std::string, std::string, std::string>> items;
  flatten(root, "", source, items);
  for (const auto& [key, text, where] : items) c.assign(key, text, where);
  return c;
}

Config Config::load(const std::string& path, const std::vector<std::string>& overrides) {
  Config c;
  if (!path.empty()) {
    std::ifstream in(path);
    if (!in) throw Error(ErrorKind::kConfig, cat(path, ": cannot open config file"));
    std::stringstream ss;
    ss << in.rdbuf();
    c = parse(ss.str(), path);
  }
  for (const auto& o : overrides) c.set(o);
  return c;
}

void Config::set(const std::string& assignment, const std::string& source) {
  size_t eq = assignment.find('=');
  if (eq == std::string::npos)
    config_error(source, cat("'", assignment, "' is not of the form key=value"));
  std::string key = trim(assignment.substr(0, eq));
  std::string value = assignment.substr(eq + 1);
  // Accept YAML quoting in overrides: --set data.path="a b.h5".
  std::string t = trim(value);
  if (t.size() >= 2 && (t.front() == '"' || t.front() == '\'') && t.back() == t.front())
    value = t.substr(1, t.size() - 2);
  assign(key, value, source);
}

const Config::Entry& Config::entry(const std::string& key, ConfigType type) const {
  auto it = values_.find(key);
  MOE_CHECK(it != values_.end(), "config key '", key, "' is not in the schema");
  MOE_CHECK(find_config_key(key)->type == type, "config key '", key, "' read as ",
            config_type_name(type));
  return it->second;
}

int64_t Config::get_int(const std::string& key) const {
  return std::get<int64_t>(entry(key, T::kInt).value);
}
double Config::get_float(const std::string& key) const {
  return std::get<double>(entry(key, T::kFloat).value);
}
bool Config::get_bool(const std::string& key) const {
  return std::get<bool>(entry(key, T::kBool).value);
}
const std::string& Config::get_string(const std::string& key) const {
  return std::get<std::string>(entry(key, T::kString).value);
}
const std::string& Config::origin(const std::string& key) const {
  auto it = values_.find(key);
  MOE_CHECK(it != values_.end(), "config key '", key, "' is not in the schema");
  return it->second.origin;
}

std::string Config::to_yaml() const {
  std::ostringstream os;
  std::string section;
  for (const auto& k : kSchema) {
    // Keys are "a.b" or "a.b.c": print nested sections with two-space indents.
    std::vector<std::string> parts;
    std::stringstream ss(k.key);
    for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
    std::string sec = k.key.substr(0, k.key.rfind('.'));
    if (sec != section) {
      // Open the sections that differ from the previous key's.
      std::vector<std::string> old;
      std::stringstream so(section);
      for (std::string p; std::getline(so, p, '.');) old.push_back(p);
      size_t common = 0;
      while (common < old.size() && common + 1 < parts.size() && old[common] == parts[common])
        ++common;
      for (size_t i = common; i + 1 < parts.size(); ++i)
        os << std::string(2 * i, ' ') << parts[i] << ":\n";
      section = sec;
    }
    const Entry& e = values_.at(k.key);
    os << std::string(2 * (parts.size() - 1), ' ') << parts.back() << ": " << format_value(e.value);
    if (e.origin != "default") os << "  # " << e.origin;
    os << "\n";
  }
  return os.str();
}

std::string config_schema_markdown() {
  std::ostringstream os;
  os << "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n";
  for (const auto& k : kSchema) {
    const char* type = k.type == T::kInt     ? "int"
                       : k.type == T::kFloat ? "float"
                       : k.type == T::kBool  ? "bool"
                                             : "string";
    // Pipes inside a cell must be escaped in Markdown.
    auto escape = [](const std::string& cell) {
      std::string out;
      for (char c : cell) {
        if (c == '|') out += '\\';
        out += c;
      }
      return out;
    };
    std::string allowed = escape(range_text(k)), doc = escape(k.doc);
    os << "| `" << k.key << "` | " << type << " | `" << k.default_value << "` | " << allowed
       << " | " << doc << " |\n";
  }
  return os.str();
}

}  // namespace moe
