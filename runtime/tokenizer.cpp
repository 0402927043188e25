#include "runtime/tokenizer.hpp"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "runtime/error.hpp"

namespace moe {

namespace {
// sentencepiece drops '\n' while normalising; it is mapped to this private-use character, which
// is a user-defined piece of the model, and back on decode.
constexpr std::string_view kNewline = "\xE2\x90\xA4";  // U+2424 SYMBOL FOR NEWLINE

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}
}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& kind, const std::string& bytes) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  if (kind == "bpe") return std::make_unique<BpeTokenizer>(bytes);
  throw Error(ErrorKind::kData, cat("unknown tokenizer kind '", kind, "' (expected byte or bpe)"));
}

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] > 255)
      throw Error(ErrorKind::kData, cat("byte tokenizer: id ", ids[i], " outside [0, 256)"));
    s[i] = static_cast<char>(ids[i]);
  }
  return s;
}

struct BpeTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

std::unique_ptr<BpeTokenizer> BpeTokenizer::train(const std::vector<std::string>& files,
                                                  int64_t vocab_size, int n_threads) {
  if (vocab_size < 300 || vocab_size > 65536)
    throw Error(ErrorKind::kConfig,
                cat("--vocab-size ", vocab_size, " for bpe must be in [300, 65536]"));
  std::string inputs;
  for (const auto& f : files) inputs += (inputs.empty() ? "" : ",") + f;
  std::string model;
  auto status =
      sentencepiece::SentencePieceTrainer::Train({{"input", inputs},
                                                  {"model_type", "bpe"},
                                                  {"vocab_size", std::to_string(vocab_size)},
                                                  {"character_coverage", "1.0"},
                                                  {"byte_fallback", "true"},
                                                  {"normalization_rule_name", "identity"},
                                                  {"remove_extra_whitespaces", "false"},
                                                  {"split_digits", "true"},
                                                  {"user_defined_symbols", std::string(kNewline)},
                                                  {"input_sentence_size", "2000000"},
                                                  {"shuffle_input_sentence", "true"},
                                                  {"max_sentence_length", "16384"},
                                                  {"num_threads", std::to_string(n_threads)},
                                                  {"minloglevel", "2"},
                                                  {"unk_id", "0"},
                                                  {"bos_id", "-1"},
                                                  {"eos_id", "-1"},
                                                  {"pad_id", "-1"}},
                                                 nullptr, &model);
  if (!status.ok()) throw Error(ErrorKind::kData, cat("bpe training failed: ", status.ToString()));
  return std::make_unique<BpeTokenizer>(model);
}

BpeTokenizer::BpeTokenizer(const std::string& serialized_model)
    : impl_(std::make_unique<Impl>()), model_(serialized_model) {
  auto status = impl_->sp.LoadFromSerializedProto(serialized_model);
  if (!status.ok())
    throw Error(ErrorKind::kData, cat("cannot load bpe tokenizer model: ", status.ToString()));
}

BpeTokenizer::~BpeTokenizer() = default;

int64_t BpeTokenizer::vocab_size() const {
  return impl_->sp.GetPieceSize();
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  std::string mapped = replace_all(text, "\n", kNewline);
  auto status = impl_->sp.Encode(mapped, &ids);
  if (!status.ok()) throw Error(ErrorKind::kData, cat("bpe encode: ", status.ToString()));
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> v(ids.begin(), ids.end());
  for (int id : v)
    if (id < 0 || id >= impl_->sp.GetPieceSize())
      throw Error(ErrorKind::kData,
                  cat("bpe tokenizer: id ", id, " outside [0, ", impl_->sp.GetPieceSize(), ")"));
  std::string text;
  auto status = impl_->sp.Decode(v, &text);
  if (!status.ok()) throw Error(ErrorKind::kData, cat("bpe decode: ", status.ToString()));
  return replace_all(text, kNewline, "\n");
}

}  // namespace moe
