// moe-data: build and inspect HDF5 token files.
//   moe-data build --input FILE... --output data.h5 [--tokenizer byte|bpe] [--vocab-size N]
//                  [--val-fraction F]
//   moe-data info data.h5
// The file layout is documented in runtime/data.hpp and the README.
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "comm/communicator.hpp"
#include "runtime/data.hpp"
#include "runtime/error.hpp"
#include "runtime/h5.hpp"

namespace {

using moe::cat;
using moe::Error;
using moe::ErrorKind;

std::string read_text(const std::string& path) {
  if (!std::filesystem::exists(path)) throw Error(ErrorKind::kData, cat(path, ": no such file"));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorKind::kData, cat(path, ": cannot open for reading"));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    throw Error(ErrorKind::kData, cat(path, ": input text is empty (", text.size(), " bytes)"));
  return text;
}

int build(const std::vector<std::string>& inputs, const std::string& output,
          const std::string& kind, int64_t vocab_size, double val_fraction) {
  std::vector<std::string> texts;
  for (const auto& p : inputs) texts.push_back(read_text(p));
  std::unique_ptr<moe::Tokenizer> tok;
  if (kind == "byte") {
    tok = std::make_unique<moe::ByteTokenizer>();
  } else {
    std::printf("training bpe tokenizer (vocab %lld) on %zu file(s)...\n",
                static_cast<long long>(vocab_size), inputs.size());
    std::fflush(stdout);
    tok = moe::BpeTokenizer::train(inputs, vocab_size);
  }
  // Each source's last val_fraction of tokens goes to val, so both splits see every source.
  std::vector<int32_t> train, val;
  for (size_t i = 0; i < texts.size(); ++i) {
    std::vector<int32_t> ids = tok->encode(texts[i]);
    size_t n_val =
        static_cast<size_t>(std::llround(val_fraction * static_cast<double>(ids.size())));
    size_t cut = ids.size() - n_val;
    train.insert(train.end(), ids.begin(), ids.begin() + static_cast<int64_t>(cut));
    val.insert(val.end(), ids.begin() + static_cast<int64_t>(cut), ids.end());
    std::printf("  %s: %zu bytes -> %zu tokens (%.2f bytes/token)\n", inputs[i].c_str(),
                texts[i].size(), ids.size(),
                double(texts[i].size()) / std::max<size_t>(1, ids.size()));
  }
  std::vector<std::string> sources;
  for (const auto& p : inputs) sources.push_back(std::filesystem::path(p).filename().string());
  moe::write_token_file(output, *tok, train, val, sources, val_fraction);
  std::printf("wrote %s\n", output.c_str());
  return 0;
}

int info(const std::string& path) {
  moe::TokenFileInfo fi = moe::read_token_file_info(path);
  auto tok = moe::load_tokenizer(path);
  moe::h5::File f = moe::h5::File::open(path);
  std::printf("%s: moe-tokens v%lld, %s tokenizer, vocab %lld, ids stored as %s\n", path.c_str(),
              static_cast<long long>(fi.format_version), fi.tokenizer.c_str(),
              static_cast<long long>(fi.vocab_size), fi.token_dtype.c_str());
  std::printf("sources: ");
  for (size_t i = 0; i < fi.sources.size(); ++i)
    std::printf("%s%s", i ? ", " : "", fi.sources[i].c_str());
  std::printf("\n");
  for (const char* split : {"train", "val"}) {
    moe::h5::IntDataset d(f, cat("/", split, "/tokens"));
    std::vector<int32_t> ids(static_cast<size_t>(d.size()));
    d.read(0, d.size(), ids.data());
    // Unigram statistics: the entropy is the loss (in nats) a model that ignores context gets.
    std::vector<int64_t> count(static_cast<size_t>(fi.vocab_size), 0);
    int32_t max_id = -1;
    for (int32_t t : ids) {
      if (t >= 0 && t < fi.vocab_size) ++count[static_cast<size_t>(t)];
      max_id = std::max(max_id, t);
    }
    double h = 0;
    int64_t used = 0;
    for (int64_t c : count)
      if (c > 0) {
        double p = double(c) / double(ids.size());
        h -= p * std::log(p);
        ++used;
      }
    std::printf(
        "/%s/tokens: %lld tokens, %lld distinct ids, max id %d, unigram entropy %.3f nats "
        "(%.3f bits) per token\n",
        split, static_cast<long long>(d.size()), static_cast<long long>(used), max_id, h,
        h / std::log(2.0));
  }
  moe::h5::IntDataset d(f, "/train/tokens");
  std::vector<int32_t> head(static_cast<size_t>(std::min<int64_t>(d.size(), 48)));
  d.read(0, static_cast<int64_t>(head.size()), head.data());
  std::string sample = tok->decode(head);
  for (char& c : sample)
    if (c == '\n') c = ' ';
  std::printf("first tokens: \"%s\"\n", sample.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // MPI is initialised so that errors take the project's one fatal path under mpirun too.
  moe::comm::MpiSession mpi(&argc, &argv);
  return moe::run_or_die([&]() -> int {
    CLI::App app{"moe-data: build and inspect HDF5 token files"};
    app.require_subcommand(1);
    std::vector<std::string> inputs;
    std::string output, kind = "byte", path;
    int64_t vocab_size = 8192;
    double val_fraction = 0.01;
    auto* b = app.add_subcommand("build", "tokenize text files into an HDF5 token file");
    b->add_option("--input", inputs, "text files")->required()->expected(1, -1);
    b->add_option("--output", output, "HDF5 file to write")->required();
    b->add_option("--tokenizer", kind, "byte | bpe")->check(CLI::IsMember({"byte", "bpe"}));
    b->add_option("--vocab-size", vocab_size, "bpe vocabulary size")->check(CLI::Range(300, 65536));
    b->add_option("--val-fraction", val_fraction, "fraction of each source held out for val")
        ->check(CLI::Range(0.0, 0.5));
    auto* i = app.add_subcommand("info", "print what a token file holds");
    i->add_option("file", path, "HDF5 token file")->required();
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      if (e.get_exit_code() == 0) return app.exit(e);
      throw Error(ErrorKind::kConfig, cat("moe-data: ", e.what()));
    }
    if (b->parsed()) return build(inputs, output, kind, vocab_size, val_fraction);
    return info(path);
  });
}
