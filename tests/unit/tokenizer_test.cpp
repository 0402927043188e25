// Tokenizers on real text: byte-level is lossless; BPE trained on the bundled Genesis excerpt
// round-trips it (newlines included), compresses it, and survives serialisation.
#include "runtime/tokenizer.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "runtime/error.hpp"

namespace {
std::string genesis() {
  std::ifstream in(std::string(MOE_TEST_DATA) + "/genesis.txt");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

TEST(ByteTokenizer, IsLossless) {
  moe::ByteTokenizer tok;
  std::string text = "caf\xC3\xA9\n\t\x01 end";
  auto ids = tok.encode(text);
  EXPECT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[3], 0xC3);
  EXPECT_EQ(tok.decode(ids), text);
  EXPECT_THROW(tok.decode({256}), moe::Error);
}

TEST(BpeTokenizer, TrainsRoundTripsAndSerialises) {
  std::string path = std::string(MOE_TEST_DATA) + "/genesis.txt";
  auto tok = moe::BpeTokenizer::train({path}, 512, 1);
  EXPECT_EQ(tok->vocab_size(), 512);
  std::string text = genesis().substr(0, 5000);
  auto ids = tok->encode(text);
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_LT(ids.size() * 2, text.size()) << "BPE should compress English prose over 2x";
  for (int32_t id : ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 512);
  }
  auto again = moe::Tokenizer::load("bpe", tok->serialize());
  EXPECT_EQ(again->encode(text), ids);
  // Text the model never saw still round-trips through byte fallback.
  std::string odd = "Zyzzyva \xE2\x82\xAC 42!\n";
  EXPECT_EQ(tok->decode(tok->encode(odd)), odd);
}

TEST(Tokenizer, UnknownKindAndGarbageModelAreDataErrors) {
  try {
    moe::Tokenizer::load("wordpiece", "");
    FAIL();
  } catch (const moe::Error& e) {
    EXPECT_EQ(e.kind(), moe::ErrorKind::kData);
  }
  EXPECT_THROW(moe::Tokenizer::load("bpe", "not a model"), moe::Error);
}
