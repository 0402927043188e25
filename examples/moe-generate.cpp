// moe-generate: sample text from a trained checkpoint with the same expert-parallel forward.
//   mpirun -np N build/bin/moe-generate --checkpoint DIR --prompt "..." [--max-tokens 200]
//          [--temperature 0.8] [--top-k 0] [--top-p 1.0] [--seed 0] [--data FILE]
//          [--weights fp32|bf16]
// The model shape comes from the configuration stored in the checkpoint; the tokenizer from the
// token file it was trained on (or --data). --weights bf16 rounds the attention and expert
// weights to bf16 first (Transformer::round_inference_weights), as moe-serve --weights bf16
// does, so greedy text equals the server's with the same flag.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "comm/communicator.hpp"
#include "model/generate.hpp"
#include "model/transformer.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/data.hpp"
#include "runtime/error.hpp"
#include "runtime/log.hpp"
#include "runtime/threads.hpp"

int main(int argc, char** argv) {
  moe::comm::MpiSession mpi(&argc, &argv);
  return moe::run_or_die([&]() -> int {
    using moe::cat;
    CLI::App app{"moe-generate: sample from a checkpoint"};
    std::string ckpt, prompt, data, weights_name = "fp32";
    int64_t max_tokens = 200;
    moe::model::SampleOptions so;
    so.temperature = 0.8;
    app.add_option("--checkpoint", ckpt, "checkpoint root or step directory")->required();
    app.add_option("--prompt", prompt, "text to continue")->required();
    app.add_option("--max-tokens", max_tokens, "tokens to generate")->check(CLI::Range(1, 1 << 20));
    app.add_option("--temperature", so.temperature, "0 = greedy")->check(CLI::Range(0.0, 100.0));
    app.add_option("--top-k", so.top_k, "sample among the k most likely (0 = all)")
        ->check(CLI::Range(0, 1 << 24));
    app.add_option("--top-p", so.top_p, "nucleus sampling mass")->check(CLI::Range(0.0, 1.0));
    app.add_option("--seed", so.seed, "sampling seed");
    app.add_option("--data", data, "token file whose tokenizer to use (default: the run's)");
    app.add_option("--weights", weights_name,
                   "fp32, or bf16: attention and expert weights rounded to bf16");
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      if (e.get_exit_code() == 0) return app.exit(e);
      throw moe::Error(moe::ErrorKind::kConfig, cat("moe-generate: ", e.what()));
    }
    const moe::WeightType weights = moe::parse_weight_type(weights_name);
    moe::comm::Communicator world = moe::comm::Communicator::world();
    moe::log::init(world.rank(), world.size(), "warn");
    moe::ThreadPolicy threads;
    threads.apply(world.size());

    moe::model::LoadedModel loaded = moe::model::load_for_inference(ckpt, data, world);
    moe::model::Transformer& model = *loaded.model;
    model.round_inference_weights(weights);
    const moe::Config& config = loaded.config;
    const auto& tok = loaded.tokenizer;
    const moe::checkpoint::Metadata& meta = loaded.meta;

    std::vector<int32_t> ids = tok->encode(prompt);
    std::vector<int32_t> out =
        moe::model::generate(model, ids, max_tokens, config.get_int("train.seq_len"), so, world);
    if (world.rank() == 0) {
      std::printf("[checkpoint step %lld, %d rank(s), temperature %g, weights %s]\n%s%s\n",
                  static_cast<long long>(meta.step), world.size(), so.temperature,
                  moe::weight_type_name(weights), prompt.c_str(), tok->decode(out).c_str());
    }
    return 0;
  });
}
