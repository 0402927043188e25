// File: data.hpp — HDF5 token files and the TokenDataset reader.
//
// Layout of a token file (format "moe-tokens", version 1), readable by h5dump and h5py:
//   /train/tokens     1-D, uint8 (vocab <= 256) | uint16 (<= 65536) | int32, contiguous
//   /val/tokens       same type
//   /tokenizer/model  1-D uint8: the serialised tokenizer (empty for byte)
//   root attributes:  format, format_version, vocab_size, tokenizer, token_dtype,
//                     n_train_tokens, n_val_tokens, val_fraction, sources (newline-separated),
//                     max_token_id
//
// TokenDataset yields windows of seq_len + 1 tokens (inputs and shifted targets). Window i of
// step s starts at a position drawn from a counter-based hash of (seed, s, i), so the global
// batch of a step is the same on any rank count and rank r of P reads only its contiguous share.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/h5.hpp"
#include "runtime/hash.hpp"
#include "runtime/tokenizer.hpp"

namespace moe {

struct TokenFileInfo {
  std::string path;
  int64_t format_version = 0;
  int64_t vocab_size = 0;
  std::string tokenizer;    // byte | bpe
  std::string token_dtype;  // uint8 | uint16 | int32
  int64_t n_train = 0, n_val = 0;
  int64_t max_token_id = -1;
  double val_fraction = 0;
  std::vector<std::string> sources;
};

// One source text's tokens, split into train and val parts.
struct TokenSplit {
  std::vector<int32_t> train, val;
};

// Writes a token file atomically (temporary file + rename): a failure never leaves a half file.
void write_token_file(const std::string& path, const Tokenizer& tokenizer,
                      const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                      const std::vector<std::string>& sources, double val_fraction);

// Reads the attributes and checks the format. Errors (kData) name the file and what is wrong.
TokenFileInfo read_token_file_info(const std::string& path);

// The tokenizer stored in a token file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

class TokenDataset {
 public:
  // Opens `split` ("train" or "val") of a token file. vocab_size 0 takes the file's. Checks, with
  // errors naming file and dataset: the dataset exists, is 1-D with integer ids, holds at least
  // one window (seq_len + 1 tokens), and its largest id (attribute max_token_id when present)
  // is below vocab_size. Every window read is also checked, for files written by other tools.
  TokenDataset(const std::string& path, const std::string& split, int64_t seq_len,
               int64_t vocab_size = 0);

  int64_t n_tokens() const { return data_.size(); }
  int64_t seq_len() const { return seq_len_; }
  int64_t vocab_size() const { return vocab_size_; }
  const TokenFileInfo& info() const { return info_; }

  // Start position of window `index` of batch `step`: uniform in [0, n_tokens - seq_len - 1].
  int64_t window_start(uint64_t seed, int64_t step, int64_t index) const;
  // Reads windows [first, first + count) of batch `step` into out [count, seq_len + 1].
  void read_windows(uint64_t seed, int64_t step, int64_t first, int64_t count, int32_t* out) const;
  // Rank r's share of a global batch of `global_batch` windows: windows [r*B/P, (r+1)*B/P),
  // B divisible by P (checked). out [global_batch / n_ranks, seq_len + 1].
  void read_rank_batch(uint64_t seed, int64_t step, int64_t global_batch, int rank, int n_ranks,
                       int32_t* out) const;

 private:
  std::string path_, dataset_;
  TokenFileInfo info_;
  h5::File file_;
  h5::IntDataset data_;
  int64_t seq_len_ = 0, vocab_size_ = 0;
};

// Splits n_seq windows [n_seq, seq_len + 1] into the model's inputs (each window's first
// seq_len tokens) and targets (its last seq_len), both [n_seq * seq_len] (resized). Checks the
// windows' size.
void split_windows(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len,
                   std::vector<int32_t>& ids, std::vector<int32_t>& targets);

}  // namespace moe
