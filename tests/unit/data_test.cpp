// Token files and TokenDataset on real HDF5 files: round trips, determinism, rank sharding, and
// every bad input a user can hand us, each with an error naming the file and what was expected.
#include "runtime/data.hpp"

#include <gtest/gtest.h>
#include <hdf5.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/error.hpp"

using moe::Error;
using moe::ErrorKind;
using moe::TokenDataset;

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class DataTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("moe_data_test_" + std::to_string(::getpid()) + "_" +
            testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A byte-level token file of the bundled Genesis excerpt.
  std::string genesis_file() {
    std::string text = read_file(std::string(MOE_TEST_DATA) + "/genesis.txt");
    moe::ByteTokenizer tok;
    auto ids = tok.encode(text);
    size_t cut = ids.size() * 9 / 10;
    std::vector<int32_t> train(ids.begin(), ids.begin() + cut), val(ids.begin() + cut, ids.end());
    std::string p = path("genesis.h5");
    moe::write_token_file(p, tok, train, val, {"genesis.txt"}, 0.1);
    return p;
  }

  // A raw HDF5 file with one dataset of the given type, for malformed-input tests; optionally
  // with the token-file attributes so that only the dataset is wrong.
  std::string raw_file(const std::string& name, hid_t type, const void* data, hsize_t n,
                       const char* dset = "/train/tokens", bool attrs = true,
                       int64_t max_token_id = -1) {
    std::string p = path(name);
    hid_t f = H5Fcreate(p.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t g = H5Gcreate2(f, "/train", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Gclose(g);
    if (dset) {
      hid_t s = H5Screate_simple(1, &n, nullptr);
      hid_t d = H5Dcreate2(f, dset, type, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
      H5Dclose(d);
      H5Sclose(s);
    }
    H5Fclose(f);
    if (attrs) {
      hid_t f3 = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
      auto set_str = [&](const char* k, const char* v) {
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, H5T_VARIABLE);
        hid_t s = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(f3, k, t, s, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, t, &v);
        H5Aclose(a);
        H5Sclose(s);
        H5Tclose(t);
      };
      auto set_int = [&](const char* k, int64_t v) {
        hid_t s = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(f3, k, H5T_NATIVE_INT64, s, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_INT64, &v);
        H5Aclose(a);
        H5Sclose(s);
      };
      auto set_dbl = [&](const char* k, double v) {
        hid_t s = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(f3, k, H5T_NATIVE_DOUBLE, s, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_DOUBLE, &v);
        H5Aclose(a);
        H5Sclose(s);
      };
      set_str("format", "moe-tokens");
      set_int("format_version", 1);
      set_int("vocab_size", 256);
      set_str("tokenizer", "byte");
      set_str("token_dtype", "uint8");
      set_int("n_train_tokens", static_cast<int64_t>(n));
      set_int("n_val_tokens", 0);
      set_dbl("val_fraction", 0.0);
      set_str("sources", "test");
      if (max_token_id >= 0) set_int("max_token_id", max_token_id);
      H5Fclose(f3);
    }
    return p;
  }

  std::filesystem::path dir_;
};

template <typename F>
void expect_data_error(F f, std::initializer_list<std::string> fragments) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kData) << e.what();
    for (const auto& frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos)
          << "'" << frag << "' not in: " << e.what();
  }
}

}  // namespace

TEST_F(DataTest, WritesAndReadsBackTheTokensAndAttributes) {
  std::string p = genesis_file();
  moe::TokenFileInfo info = moe::read_token_file_info(p);
  EXPECT_EQ(info.vocab_size, 256);
  EXPECT_EQ(info.tokenizer, "byte");
  EXPECT_EQ(info.token_dtype, "uint8");
  EXPECT_EQ(info.sources, std::vector<std::string>{"genesis.txt"});
  std::string text = read_file(std::string(MOE_TEST_DATA) + "/genesis.txt");
  EXPECT_EQ(info.n_train + info.n_val, static_cast<int64_t>(text.size()));
  TokenDataset ds(p, "train", 32);
  std::vector<int32_t> w(33);
  ds.read_windows(7, 3, 0, 1, w.data());
  int64_t start = ds.window_start(7, 3, 0);
  for (int i = 0; i < 33; ++i) EXPECT_EQ(w[i], static_cast<unsigned char>(text[start + i]));
  auto tok = moe::load_tokenizer(p);
  EXPECT_EQ(tok->decode(w), text.substr(start, 33));
}

TEST_F(DataTest, WindowsAreDeterministicAndRankShardsTileTheGlobalBatch) {
  std::string p = genesis_file();
  TokenDataset ds(p, "train", 16);
  const int64_t B = 8, W = 17;
  std::vector<int32_t> global(B * W), again(B * W), other(B * W);
  ds.read_windows(42, 5, 0, B, global.data());
  ds.read_windows(42, 5, 0, B, again.data());
  ds.read_windows(42, 6, 0, B, other.data());
  EXPECT_EQ(global, again);
  EXPECT_NE(global, other);  // the next step draws other windows
  for (int P : {1, 2, 4, 8}) {
    std::vector<int32_t> tiled;
    for (int r = 0; r < P; ++r) {
      std::vector<int32_t> part(B / P * W);
      ds.read_rank_batch(42, 5, B, r, P, part.data());
      tiled.insert(tiled.end(), part.begin(), part.end());
    }
    EXPECT_EQ(tiled, global) << P << " ranks";
  }
  std::vector<int32_t> part(W);
  try {
    ds.read_rank_batch(42, 5, 6, 0, 4, part.data());
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kConfig);
    EXPECT_NE(std::string(e.what()).find("not divisible by 4 ranks"), std::string::npos);
  }
}

TEST_F(DataTest, WindowStartsCoverTheWholeRange) {
  std::string p = genesis_file();
  TokenDataset ds(p, "val", 8);
  int64_t n_starts = ds.n_tokens() - 8;
  int64_t lo = n_starts, hi = -1;
  for (int i = 0; i < 20000; ++i) {
    int64_t s = ds.window_start(1, 0, i);
    ASSERT_GE(s, 0);
    ASSERT_LT(s, n_starts);
    lo = std::min(lo, s);
    hi = std::max(hi, s);
  }
  EXPECT_LT(lo, n_starts / 100);
  EXPECT_GT(hi, n_starts - n_starts / 100);
}

TEST_F(DataTest, MissingFile) {
  expect_data_error([&] { TokenDataset(path("nope.h5"), "train", 8); },
                    {path("nope.h5"), "no such file"});
}

TEST_F(DataTest, NotAnHdf5File) {
  std::ofstream(path("text.h5")) << "In the beginning\n";
  expect_data_error([&] { TokenDataset(path("text.h5"), "train", 8); },
                    {path("text.h5"), "not an HDF5 file"});
}

TEST_F(DataTest, Hdf5FileThatIsNotATokenFile) {
  uint8_t ids[4] = {1, 2, 3, 4};
  std::string p = raw_file("plain.h5", H5T_NATIVE_UINT8, ids, 4, "/train/tokens", false);
  expect_data_error([&] { TokenDataset(p, "train", 2); }, {p, "not a token file"});
}

TEST_F(DataTest, MissingDataset) {
  std::string p = raw_file("nodset.h5", H5T_NATIVE_UINT8, nullptr, 0, nullptr);
  expect_data_error([&] { TokenDataset(p, "train", 2); }, {p, "missing dataset '/train/tokens'"});
  std::string q = genesis_file();
  // A split that exists in no file.
  try {
    TokenDataset(q, "test", 2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kConfig);
  }
}

TEST_F(DataTest, WrongElementType) {
  float f[4] = {1, 2, 3, 4};
  std::string p = raw_file("float.h5", H5T_NATIVE_FLOAT, f, 4);
  expect_data_error(
      [&] { TokenDataset(p, "train", 2); },
      {p, "'/train/tokens' has a floating-point element type", "expected uint8, uint16 or int32"});
  int64_t l[4] = {1, 2, 3, 4};
  std::string q = raw_file("int64.h5", H5T_NATIVE_INT64, l, 4);
  expect_data_error([&] { TokenDataset(q, "train", 2); }, {"unsupported element type (8 bytes)"});
}

TEST_F(DataTest, TokenIdOutsideTheVocabulary) {
  // Declared through max_token_id: caught when the dataset is opened.
  uint16_t ids[8] = {1, 2, 3, 300, 4, 5, 6, 7};
  std::string p = raw_file("big.h5", H5T_NATIVE_UINT16, ids, 8, "/train/tokens", true, 300);
  expect_data_error([&] { TokenDataset(p, "train", 2); },
                    {p, "token id 300", "outside the model's vocabulary of 256"});
  // Not declared (a file from another tool): caught in the window that holds it.
  std::string q = raw_file("big2.h5", H5T_NATIVE_UINT16, ids, 8);
  TokenDataset ds(q, "train", 7);  // one window: the whole dataset
  std::vector<int32_t> w(8);
  expect_data_error([&] { ds.read_windows(0, 0, 0, 1, w.data()); },
                    {q, "token id 300 at position 3", "outside the vocabulary [0, 256)"});
  // A model vocabulary smaller than the file's.
  std::string g = genesis_file();
  expect_data_error([&] { TokenDataset(g, "train", 8, 50); },
                    {"outside the model's vocabulary of 50"});
}

TEST_F(DataTest, DatasetShorterThanOneWindow) {
  uint8_t ids[5] = {1, 2, 3, 4, 5};
  std::string p = raw_file("short.h5", H5T_NATIVE_UINT8, ids, 5);
  expect_data_error([&] { TokenDataset(p, "train", 8); },
                    {p, "has 5 tokens, fewer than one window of seq_len + 1 = 9"});
  EXPECT_NO_THROW(TokenDataset(p, "train", 4));  // exactly one window
}

TEST_F(DataTest, FailedWriteLeavesNoHalfFile) {
  moe::ByteTokenizer tok;
  std::string p = path("no/such/dir/out.h5");
  EXPECT_THROW(moe::write_token_file(p, tok, {1, 2}, {3}, {"x"}, 0.1), Error);
  EXPECT_FALSE(std::filesystem::exists(p));
}
