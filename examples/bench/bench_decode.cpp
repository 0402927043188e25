// moe-bench decode: greedy decoding through the KV caches (Transformer::extend), no HTTP.
//   mpirun -np 2 moe-bench decode [--batch 1,8,32] [--rank0-only] [--unpacked] [--json]
//                                 [--weights fp32|bf16]
//                                                                      2 ranks x 1 thread
//   moe-bench decode --threads 2 [--json]                              1 rank  x 2 threads
// The model is the PyTorch reference's default decode model (`torch_reference.py decode`):
// d_model 256, 4 layers, 4 heads, 8 experts top-2 of width 1024 in every block, vocabulary 256,
// random weights (--checkpoint DIR: that checkpoint's shape and weights instead, e.g. before and
// after moe-prune); per batch size B, a prompt of 32 tokens per sequence is prefilled in one
// extend, then 63 one-token decode steps yield 64 new tokens per sequence. As in serving
// (model/serve/engine.hpp), the sequences are spread over the ranks in contiguous blocks (each
// rank runs attention and the LM head of its block), every step rank 0 broadcasts the B token
// ids and gathers the [B, V] logits, and samples; --rank0-only keeps every sequence on rank 0
// (the other ranks join each step with no tokens). The expert weights are packed for decoding
// (Transformer::pack_for_inference, as the server does); --unpacked runs the experts' GEMMs on
// BLIS instead. --weights bf16 rounds the attention and expert weights to bf16 and packs them
// in bf16 (half the bytes; Transformer::pack_for_inference(kBf16), as moe-serve --weights
// bf16). Figures, each measured in this run:
//   decode_tokens_per_s   B x decode steps / decode seconds (decode steps only, as PyTorch's)
//   ms_per_step           decode seconds / decode steps (median over samples)
//   bandwidth_gbs         streaming read of a 256 MB buffer per rank, all ranks and threads at
//                         once (best of 5): this machine's memory bandwidth as this run sees it
//   active_mb             bytes one decode step must read at least once: every dense weight
//                         (attention, norms, routers, LM head; not the untied embedding table)
//                         plus the experts the step's tokens were routed to (per layer and step);
//                         the packed attention and expert weights at 2 bytes each with bf16
//   limit_ms              active bytes / bandwidth: the physical limit of one step
//   limit_ratio           ms_per_step / limit_ms (1 = the step runs at memory speed)
//   flops_per_token       multiply-adds x 2 of one decode token: every dense weight once, top-k
//                         experts per MoE layer, attention over the cached positions (mean)
//   compute_ms            B x flops_per_token at peak_gflops (all ranks x threads at this
//                         machine's fp32 FMA peak): the step's compute limit
// The KV cache reads (B x context x 2 d x 4 bytes per block) are printed too, not counted in
// the limit.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>

#include "comm/communicator.hpp"
#include "examples/bench/bench.hpp"
#include "model/generate.hpp"
#include "model/transformer.hpp"
#include "runtime/cpu.hpp"
#include "runtime/threads.hpp"

namespace moe::bench {
namespace {

// GB/s of a streaming read over `mb` MB per rank, every rank at once, summed over ranks.
double read_bandwidth_gbs(const comm::Communicator& world, int64_t mb) {
  const int64_t n = mb * (int64_t(1) << 20) / int64_t(sizeof(float));
  std::unique_ptr<float[]> buf(new float[static_cast<size_t>(n)]);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) buf[static_cast<size_t>(i)] = float(i & 1023);
  double best = 1e30, sink = 0;
  constexpr int64_t kLanes = 64;  // independent sums: the loop is bound by loads, not adds
  for (int rep = 0; rep < 5; ++rep) {
    world.barrier();
    const double t0 = now_s();
    float s = 0;
#pragma omp parallel reduction(+ : s)
    {
      float acc[kLanes] = {};
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n / kLanes; ++i) {
        const float* p = buf.get() + i * kLanes;
        for (int64_t j = 0; j < kLanes; ++j) acc[j] += p[j];
      }
      for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
    }
    best = std::min(best, world.max(now_s() - t0));
    sink += s;
  }
  if (sink == -1) std::printf(" ");  // keeps the reads
  return world.sum(double(n) * sizeof(float)) / best / 1e9;
}

struct BatchResult {
  int64_t batch = 0;
  std::vector<double> decode_s, prefill_s;  // per sample
  double active_bytes = 0;                  // per decode step (mean)
  double flops_per_token = 0;               // per decode token (mean)
  double kv_bytes = 0;                      // per decode step (mean)
  double experts_hit = 0;                   // per decode step, summed over MoE layers (mean)
  double expert_s = 0, exchange_s = 0;      // rank 0, per decode step (mean): experts, All2All
  std::vector<int32_t> first_tokens;        // sequence 0's greedy tokens (last sample)
};

int bench_decode(const std::vector<std::string>& argv) {
  Args args(argv);
  comm::Communicator world = comm::Communicator::world();
  const int P = world.size(), rank = world.rank();
  const bool root = rank == 0, json = args.flag("--json");
  ThreadPolicy policy;
  policy.omp_threads = static_cast<int>(args.get_int("--threads", 0));
  policy.apply(P);

  // --checkpoint DIR: the checkpoint's model (shape and weights, e.g. before and after
  // moe-prune); otherwise a random model of the shape given by the flags below.
  const std::string ckpt = args.get("--checkpoint", "");
  model::ModelConfig cfg;
  cfg.vocab_size = args.get_int("--vocab", 256);
  cfg.d_model = args.get_int("--d-model", 256);
  cfg.n_layers = static_cast<int>(args.get_int("--layers", 4));
  cfg.n_heads = static_cast<int>(args.get_int("--heads", 4));
  cfg.d_ff = args.get_int("--d-ff", 1024);
  cfg.moe_every_n = 1;
  cfg.moe.n_experts = static_cast<int>(args.get_int("--experts", 8));
  cfg.moe.top_k = static_cast<int>(args.get_int("--top-k", 2));
  cfg.moe.d_ff = cfg.d_ff;
  cfg.tie_embeddings = false;  // as the reference (and examples/configs/small.yaml)
  const std::vector<int64_t> batches = args.get_ints("--batch", {1, 8, 32});
  const int64_t prompt_len = args.get_int("--prompt-len", 32);
  const int64_t new_tokens = args.get_int("--new-tokens", 64);
  const int samples = static_cast<int>(args.get_int("--samples", 5));
  if (new_tokens < 2 || prompt_len < 1 || samples < 1)
    throw Error(ErrorKind::kConfig,
                "decode needs --new-tokens >= 2, --prompt-len >= 1, "
                "--samples >= 1");
  const int64_t steps = new_tokens - 1;
  const bool spread = !args.flag("--rank0-only");

  std::unique_ptr<model::Transformer> owned;
  if (ckpt.empty()) {
    owned = std::make_unique<model::Transformer>(cfg, world,
                                                 static_cast<uint64_t>(args.get_int("--seed", 1)));
  } else {
    owned = std::move(model::load_for_inference(ckpt, "", world).model);
    cfg = owned->config();
  }
  model::Transformer& model = *owned;
  const bool packed = !args.flag("--unpacked");  // --unpacked: experts on BLIS, as before
  const WeightType weights = parse_weight_type(args.get("--weights", "fp32"));
  if (packed)
    model.pack_for_inference(weights);
  else
    model.round_inference_weights(weights);  // BLIS on the rounded fp32 weights
  // Bytes per weight of what the step streams: the packed copies (bf16 or fp32); unpacked,
  // the fp32 weights themselves.
  const double packed_bytes = packed && weights == WeightType::kBf16 ? 2 : 4;
  const double bandwidth = read_bandwidth_gbs(world, args.get_int("--bandwidth-mb", 256));

  // Bytes a step reads at least once: all dense weights, and per MoE layer the experts hit.
  double dense_bytes = 0, dense_params = 0;
  auto ends_with = [](const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  };
  for (const auto& p : model.dense_params()) {  // the untied embedding: only B rows are read
    if (p.name == "embed.weight") continue;
    const bool attn_packed = ends_with(p.name, ".attn.w_qkv") || ends_with(p.name, ".attn.w_o");
    dense_bytes += double(p.value.size()) * (attn_packed ? packed_bytes : 4);
    dense_params += double(p.value.size());
  }
  const int64_t d = cfg.d_model, f = cfg.moe.d_ff;
  const double expert_bytes = double(2 * d * f) * packed_bytes;  // W1 [d, f] + W2 [f, d]
  const auto moe_layers = model.moe_layers();
  // FLOPs of one token: 2 per dense weight (the embedding row is a copy), 2 per weight of each
  // of its top-k experts in every MoE layer, and 4 d per attended position and layer (scores
  // and the weighted sum of values), added per step from the caches' lengths.
  const double token_flops =
      2 * dense_params + 2.0 * cfg.moe.top_k * double(2 * d * f) * double(moe_layers.size());
  const double peak_gflops = world.sum(measure_cpu_peak(policy.omp_threads).gflops);
  auto experts_hit = [&] {
    int64_t hit = 0;
    for (const model::MoeLayer* m : moe_layers)
      for (int64_t c : m->plan().stats().expert_tokens) hit += c > 0;
    return hit;
  };

  model::SampleOptions greedy;
  greedy.temperature = 0;
  std::mt19937_64 rng(0);
  std::vector<BatchResult> results;
  for (int64_t B : batches) {
    BatchResult r;
    r.batch = B;
    // This rank's block of sequences [first, first + nb).
    const int64_t nb = spread ? B / P + (rank < B % P) : (root ? B : 0);
    const int64_t first = spread ? rank * (B / P) + std::min<int64_t>(rank, B % P) : 0;
    std::vector<int64_t> counts(static_cast<size_t>(P));  // logits values per rank
    for (int q = 0; q < P; ++q)
      counts[static_cast<size_t>(q)] =
          (spread ? B / P + (q < B % P) : (q == 0 ? B : 0)) * cfg.vocab_size;
    std::vector<float> all_logits(static_cast<size_t>(root ? B * cfg.vocab_size : 0));
    std::vector<model::SequenceCache> caches;
    std::vector<model::SequenceCache*> ptrs;
    for (int64_t b = 0; b < nb; ++b) caches.push_back(model.new_cache(prompt_len + new_tokens));
    for (auto& c : caches) ptrs.push_back(&c);
    std::mt19937 prng(static_cast<uint32_t>(B));
    std::vector<int32_t> all_prompts(static_cast<size_t>(B * prompt_len));
    for (auto& t : all_prompts)
      t = static_cast<int32_t>(prng() % static_cast<uint32_t>(cfg.vocab_size));
    const std::vector<int32_t> prompts(all_prompts.begin() + first * prompt_len,
                                       all_prompts.begin() + (first + nb) * prompt_len);
    std::vector<int64_t> n_new(static_cast<size_t>(nb), prompt_len);
    std::vector<int32_t> last(static_cast<size_t>(B));
    // Logits of every sequence on rank 0 (rank order = sequence order), greedy tokens there,
    // then this step's token ids to every rank: what the serving engine does each step.
    auto sample_all = [&](ConstView logits) {
      const float* rows = logits.data;
      if (P > 1) {
        world.gatherv(logits.data, nb * cfg.vocab_size, all_logits.data(), counts, 0,
                      "bench logits");
        rows = all_logits.data();
      }
      if (root)
        for (int64_t b = 0; b < B; ++b)
          last[static_cast<size_t>(b)] =
              model::sample(ConstView(rows + b * cfg.vocab_size, 1, cfg.vocab_size), greedy, rng);
      if (P > 1) world.broadcast(last.data(), B, 0, "bench ids");
    };
    const std::span<const int32_t> my_last(last.data() + first, static_cast<size_t>(nb));
    double hit_total = 0, kv_total = 0, expert_total = 0, exchange_total = 0, ctx_total = 0;
    for (int s = 0; s <= samples; ++s) {  // sample 0 warms up
      for (auto& c : caches) c.clear();
      r.first_tokens.clear();
      world.barrier();
      const double t0 = now_s();
      sample_all(model.extend(prompts, n_new, ptrs));
      if (root) r.first_tokens.push_back(last[0]);
      const double t1 = now_s();
      for (int64_t i = 0; i < steps; ++i) {
        if (root) kv_total += double(B) * double(caches[0].len() + 1) * 2 * d * 4 * cfg.n_layers;
        if (root) ctx_total += double(caches[0].len() + 1);
        ConstView logits = model.decode_step(my_last, ptrs);
        hit_total += double(experts_hit());
        for (const model::MoeLayer* m : moe_layers) {
          expert_total += m->stats().expert_seconds;
          exchange_total += m->stats().exchange_seconds;
        }
        sample_all(logits);
        if (root) r.first_tokens.push_back(last[0]);
      }
      const double t2 = now_s();
      if (s == 0) {
        hit_total = kv_total = expert_total = exchange_total = ctx_total = 0;
        continue;
      }
      r.prefill_s.push_back(world.max(t1 - t0));
      r.decode_s.push_back(world.max(t2 - t1));
    }
    r.experts_hit = hit_total / double(samples * steps);
    r.active_bytes = dense_bytes + r.experts_hit * expert_bytes;
    r.kv_bytes = kv_total / double(samples * steps);
    r.flops_per_token =
        token_flops + 4.0 * double(d) * double(cfg.n_layers) * ctx_total / double(samples * steps);
    r.expert_s = expert_total / double(samples * steps);
    r.exchange_s = exchange_total / double(samples * steps);
    results.push_back(std::move(r));
  }

  if (!root) return 0;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf("moe-bench decode: %d rank(s) x %s, sequences %s, experts %s, weights %s\n", P,
              policy.describe().c_str(), spread ? "spread over the ranks" : "on rank 0",
              packed ? "packed (gemm_packed)" : "on BLIS (--unpacked)", weight_type_name(weights));
  std::printf(
      "model d%lld L%d H%d dff%lld E%d top-%d vocab%lld, %s; prompt %lld + %lld new "
      "(%lld decode steps)\n",
      (long long)d, cfg.n_layers, cfg.n_heads, (long long)f, cfg.moe.n_experts, cfg.moe.top_k,
      (long long)cfg.vocab_size, ckpt.empty() ? "random weights" : ckpt.c_str(),
      (long long)prompt_len, (long long)new_tokens, (long long)steps);
  std::printf("memory bandwidth (streaming read, all ranks x threads): %.1f GB/s\n", bandwidth);
  std::printf("fp32 FMA peak (all ranks x threads): %.1f GFLOP/s\n", peak_gflops);
  std::printf("dense weights %.2f MB, one expert %.2f MB\n\n", dense_bytes / 1e6,
              expert_bytes / 1e6);
  std::printf("%6s %12s %10s %11s %9s %10s %10s %9s %8s %10s %10s\n", "batch", "tokens/s",
              "ms/step", "prefill ms", "experts", "active MB", "limit ms", "vs limit", "KV MB",
              "expert ms", "a2a ms");
  nlohmann::json per_batch = nlohmann::json::array();
  for (const BatchResult& r : results) {
    const double step_s = median(r.decode_s) / double(steps);
    const double tps = double(r.batch) / step_s;
    const double limit_s = r.active_bytes / (bandwidth * 1e9);
    std::printf("%6lld %12.0f %10.3f %11.2f %9.2f %10.2f %10.3f %9.2f %8.2f %10.3f %10.3f\n",
                (long long)r.batch, tps, step_s * 1e3, median(r.prefill_s) * 1e3, r.experts_hit,
                r.active_bytes / 1e6, limit_s * 1e3, step_s / limit_s, r.kv_bytes / 1e6,
                r.expert_s * 1e3, r.exchange_s * 1e3);
    per_batch.push_back(
        {{"batch", r.batch},
         {"decode_tokens_per_s", tps},
         {"ms_per_step", step_s * 1e3},
         {"ms_per_step_min",
          *std::min_element(r.decode_s.begin(), r.decode_s.end()) / double(steps) * 1e3},
         {"prefill_ms", median(r.prefill_s) * 1e3},
         {"experts_hit_per_step", r.experts_hit},
         {"active_bytes", r.active_bytes},
         {"kv_bytes", r.kv_bytes},
         {"expert_ms_per_step", r.expert_s * 1e3},
         {"exchange_ms_per_step", r.exchange_s * 1e3},
         {"limit_ms", limit_s * 1e3},
         {"limit_ratio", step_s / limit_s},
         {"flops_per_token", r.flops_per_token},
         {"compute_ms", double(r.batch) * r.flops_per_token / (peak_gflops * 1e9) * 1e3},
         {"tokens_seq0", r.first_tokens}});
  }
  std::printf(
      "\nexperts: experts hit per decode step, summed over the MoE layers; active MB: dense "
      "weights + those experts;\nlimit ms: active MB at the measured bandwidth; vs limit: "
      "ms/step over limit ms. KV MB (cache reads) not in the limit.\nexpert ms, a2a ms: rank 0's "
      "time per decode step in the expert GEMMs and inside All2All.\n");
  if (json) {
    nlohmann::json out = {
        {"bench", "decode"},
        {"ranks", P},
        {"threads", policy.omp_threads},
        {"spread", spread},
        {"packed", packed},
        {"weights", weight_type_name(weights)},
        {"d_model", d},
        {"layers", cfg.n_layers},
        {"heads", cfg.n_heads},
        {"d_ff", f},
        {"experts", cfg.moe.n_experts},
        {"checkpoint", ckpt},
        {"top_k", cfg.moe.top_k},
        {"vocab", cfg.vocab_size},
        {"prompt_len", prompt_len},
        {"new_tokens", new_tokens},
        {"bandwidth_gbs", bandwidth},
        {"peak_gflops", peak_gflops},
        {"prefill_flops_per_token",  // attention over (prompt + 1) / 2
         token_flops + 2.0 * double(d) * double(cfg.n_layers) * double(prompt_len + 1)},
        {"dense_bytes", dense_bytes},
        {"expert_bytes", expert_bytes},
        {"per_batch", per_batch}};
    std::printf("%s\n", out.dump().c_str());
  }
  return 0;
}

}  // namespace
MOE_BENCH("decode",
          "greedy KV-cache decoding tokens/s at batch 1,8,32 vs the memory-bandwidth "
          "limit",
          bench_decode);
}  // namespace moe::bench
