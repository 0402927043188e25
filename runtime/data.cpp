#include "runtime/data.hpp"

#include <algorithm>
#include <filesystem>

#include "runtime/error.hpp"

namespace moe {

namespace {
constexpr const char* kFormat = "moe-tokens";
constexpr int64_t kFormatVersion = 1;

[[noreturn]] void data_error(const std::string& path, const std::string& what) {
  throw Error(ErrorKind::kData, cat(path, ": ", what));
}

template <typename T>
std::vector<T> narrow(const std::vector<int32_t>& v) {
  return std::vector<T>(v.begin(), v.end());
}

void write_tokens(h5::File& f, const std::string& dset, h5::IntType type,
                  const std::vector<int32_t>& ids) {
  switch (type) {
    case h5::IntType::kU8: {
      auto v = narrow<uint8_t>(ids);
      f.write_1d(dset, type, v.data(), static_cast<int64_t>(v.size()));
      break;
    }
    case h5::IntType::kU16: {
      auto v = narrow<uint16_t>(ids);
      f.write_1d(dset, type, v.data(), static_cast<int64_t>(v.size()));
      break;
    }
    default:
      f.write_1d(dset, type, ids.data(), static_cast<int64_t>(ids.size()));
  }
}
}  // namespace

void write_token_file(const std::string& path, const Tokenizer& tokenizer,
                      const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                      const std::vector<std::string>& sources, double val_fraction) {
  const int64_t vocab = tokenizer.vocab_size();
  int32_t max_id = -1;
  for (int32_t t : train) max_id = std::max(max_id, t);
  for (int32_t t : val) max_id = std::max(max_id, t);
  MOE_CHECK(max_id < vocab, "token id ", max_id, " >= vocab ", vocab);
  const h5::IntType type = h5::int_type_for_vocab(vocab);
  std::string tmp = path + ".tmp";
  {
    h5::File f = h5::File::create(tmp);
    write_tokens(f, "/train/tokens", type, train);
    write_tokens(f, "/val/tokens", type, val);
    f.make_groups("/tokenizer");
    f.write_bytes("/tokenizer/model", tokenizer.serialize());
    f.set_attr("kind", tokenizer.kind(), "/tokenizer");
    f.set_attr("format", std::string(kFormat));
    f.set_attr("format_version", kFormatVersion);
    f.set_attr("vocab_size", vocab);
    f.set_attr("tokenizer", tokenizer.kind());
    f.set_attr("token_dtype", std::string(h5::int_type_name(type)));
    f.set_attr("n_train_tokens", static_cast<int64_t>(train.size()));
    f.set_attr("n_val_tokens", static_cast<int64_t>(val.size()));
    f.set_attr("val_fraction", val_fraction);
    f.set_attr("max_token_id", static_cast<int64_t>(max_id));
    std::string joined;
    for (const auto& s : sources) joined += (joined.empty() ? "" : "\n") + s;
    f.set_attr("sources", joined);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) data_error(path, cat("cannot move ", tmp, " into place: ", ec.message()));
}

TokenFileInfo read_token_file_info(const std::string& path) {
  h5::File f = h5::File::open(path);
  TokenFileInfo info;
  info.path = path;
  if (!f.has_attr("format") || f.attr_string("format") != kFormat)
    data_error(path, cat("not a token file (root attribute format != '", kFormat,
                         "'; write it with `moe-data build`)"));
  info.format_version = f.attr_int("format_version");
  if (info.format_version != kFormatVersion)
    data_error(path, cat("token file format version ", info.format_version,
                         " is not supported (this build reads version ", kFormatVersion, ")"));
  info.vocab_size = f.attr_int("vocab_size");
  info.tokenizer = f.attr_string("tokenizer");
  info.token_dtype = f.attr_string("token_dtype");
  info.n_train = f.attr_int("n_train_tokens");
  info.n_val = f.attr_int("n_val_tokens");
  info.val_fraction = f.attr_float("val_fraction");
  if (f.has_attr("max_token_id")) info.max_token_id = f.attr_int("max_token_id");
  std::string sources = f.attr_string("sources");
  size_t pos = 0;
  while (!sources.empty()) {
    size_t nl = sources.find('\n', pos);
    info.sources.push_back(sources.substr(pos, nl - pos));
    if (nl == std::string::npos) break;
    pos = nl + 1;
  }
  return info;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  TokenFileInfo info = read_token_file_info(path);
  h5::File f = h5::File::open(path);
  return Tokenizer::load(info.tokenizer, f.read_bytes("/tokenizer/model"));
}

TokenDataset::TokenDataset(const std::string& path, const std::string& split, int64_t seq_len,
                           int64_t vocab_size)
    : path_(path), dataset_("/" + split + "/tokens"), seq_len_(seq_len) {
  if (split != "train" && split != "val")
    throw Error(ErrorKind::kConfig, cat("data split '", split, "' is not train or val"));
  info_ = read_token_file_info(path);
  file_ = h5::File::open(path);
  data_ = h5::IntDataset(file_, dataset_);
  vocab_size_ = vocab_size > 0 ? vocab_size : info_.vocab_size;
  if (info_.max_token_id >= vocab_size_)
    data_error(path, cat("token id ", info_.max_token_id,
                         " in the file is outside the model's "
                         "vocabulary of ",
                         vocab_size_, " (the file's tokenizer has ", info_.vocab_size, " ids)"));
  if (data_.size() < seq_len + 1)
    data_error(path, cat("dataset '", dataset_, "' has ", data_.size(),
                         " tokens, fewer than one window of seq_len + 1 = ", seq_len + 1));
}

int64_t TokenDataset::window_start(uint64_t seed, int64_t step, int64_t index) const {
  const uint64_t n_starts = static_cast<uint64_t>(data_.size() - seq_len_);  // >= 1
  uint64_t h =
      mix64(mix64(mix64(seed) ^ static_cast<uint64_t>(step)) ^ static_cast<uint64_t>(index));
  // Multiply-shift maps the hash to [0, n_starts) without modulo bias worth speaking of.
  return static_cast<int64_t>((static_cast<unsigned __int128>(h) * n_starts) >> 64);
}

void TokenDataset::read_windows(uint64_t seed, int64_t step, int64_t first, int64_t count,
                                int32_t* out) const {
  const int64_t w = seq_len_ + 1;
  for (int64_t i = 0; i < count; ++i) {
    int64_t start = window_start(seed, step, first + i);
    int32_t* row = out + i * w;
    data_.read(start, w, row);
    for (int64_t j = 0; j < w; ++j)
      if (row[j] < 0 || row[j] >= vocab_size_)
        data_error(path_, cat("token id ", row[j], " at position ", start + j, " of '", dataset_,
                              "' is outside the vocabulary [0, ", vocab_size_, ")"));
  }
}

void TokenDataset::read_rank_batch(uint64_t seed, int64_t step, int64_t global_batch, int rank,
                                   int n_ranks, int32_t* out) const {
  if (global_batch % n_ranks != 0)
    throw Error(ErrorKind::kConfig, cat("global batch ", global_batch,
                                        " windows is not divisible by ", n_ranks, " ranks"));
  const int64_t per = global_batch / n_ranks;
  read_windows(seed, step, rank * per, per, out);
}

void split_windows(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len,
                   std::vector<int32_t>& ids, std::vector<int32_t>& targets) {
  MOE_CHECK_EQ(static_cast<int64_t>(windows.size()), n_seq * (seq_len + 1), "windows");
  ids.resize(static_cast<size_t>(n_seq * seq_len));
  targets.resize(static_cast<size_t>(n_seq * seq_len));
  for (int64_t s = 0; s < n_seq; ++s)
    for (int64_t t = 0; t < seq_len; ++t) {
      const size_t w = static_cast<size_t>(s * (seq_len + 1) + t);
      ids[static_cast<size_t>(s * seq_len + t)] = windows[w];
      targets[static_cast<size_t>(s * seq_len + t)] = windows[w + 1];
    }
}

}  // namespace moe
