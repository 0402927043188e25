// File: tokenizer.hpp — text <-> token ids: byte-level (default) and BPE (sentencepiece).
//
// A tokenizer serialises to bytes that are stored inside the token file (/tokenizer/model), so a
// checkpoint or a server can decode without the original text or model files.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;  // "byte" | "bpe"
  virtual int64_t vocab_size() const = 0;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // The bytes that recreate this tokenizer with Tokenizer::load(kind(), bytes).
  virtual std::string serialize() const = 0;

  // Recreates a tokenizer from its kind and serialised bytes. Throws Error(kData) on garbage.
  static std::unique_ptr<Tokenizer> load(const std::string& kind, const std::string& bytes);
};

// Every byte is a token: vocab 256, lossless on any input.
class ByteTokenizer : public Tokenizer {
 public:
  std::string kind() const override { return "byte"; }
  int64_t vocab_size() const override { return 256; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string serialize() const override { return {}; }
};

// Byte-pair encoding through sentencepiece, with byte fallback (no unknown tokens) and newlines
// kept as their own piece, so decode(encode(text)) gives the text back for ASCII prose.
class BpeTokenizer : public Tokenizer {
 public:
  // Trains on the given text files; vocab_size >= 260 (the 256 byte pieces + specials).
  static std::unique_ptr<BpeTokenizer> train(const std::vector<std::string>& files,
                                             int64_t vocab_size, int n_threads = 2);
  explicit BpeTokenizer(const std::string& serialized_model);
  ~BpeTokenizer() override;
  std::string kind() const override { return "bpe"; }
  int64_t vocab_size() const override;
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string serialize() const override { return model_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string model_;
};

}  // namespace moe
