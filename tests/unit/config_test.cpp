// Configuration schema: defaults, nested and dotted keys, overrides, and the errors a user meets.
#include "runtime/config.hpp"

#include <gtest/gtest.h>

#include <fstream>

#include "runtime/error.hpp"

using moe::Config;
using moe::Error;
using moe::ErrorKind;

namespace {

// Runs f, which must throw a config Error whose message contains every fragment.
template <typename F>
void expect_config_error(F f, std::initializer_list<const char*> fragments) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kConfig);
    for (const char* frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos)
          << "'" << frag << "' not in: " << e.what();
  }
}

}  // namespace

TEST(Config, DefaultsComeFromTheSchema) {
  Config c;
  EXPECT_EQ(c.get_int("train.seq_len"), 256);
  EXPECT_EQ(c.get_string("log.level"), "info");
  EXPECT_EQ(c.origin("train.seq_len"), "default");
  for (const auto& k : moe::config_schema()) EXPECT_FALSE(k.doc.empty()) << k.key;
}

TEST(Config, NestedAndDottedKeysAreTheSame) {
  Config a = Config::parse("train:\n  seq_len: 64\n  micro_batch: 2\n", "a.yaml");
  Config b = Config::parse("train.seq_len: 64\ntrain.micro_batch: 2\n", "b.yaml");
  EXPECT_EQ(a.get_int("train.seq_len"), 64);
  EXPECT_EQ(b.get_int("train.seq_len"), 64);
  EXPECT_EQ(a.origin("train.seq_len"), "a.yaml:2");
  EXPECT_EQ(b.get_int("train.micro_batch"), 2);
}

TEST(Config, OverridesApplyAfterTheFile) {
  Config c = Config::parse("train:\n  seq_len: 64\n", "a.yaml");
  c.set("train.seq_len=128");
  c.set("data.path=\"my data.h5\"");
  EXPECT_EQ(c.get_int("train.seq_len"), 128);
  EXPECT_EQ(c.origin("train.seq_len"), "--set");
  EXPECT_EQ(c.get_string("data.path"), "my data.h5");
}

TEST(Config, UnknownKeyNamesFileLineKeyAndSuggestion) {
  expect_config_error(
      [] { Config::parse("train:\n  seq_len: 64\n  seq_lne: 3\n", "cfg.yaml"); },
      {"cfg.yaml:3", "unknown key 'train.seq_lne'", "did you mean 'train.seq_len'"});
}

TEST(Config, WrongTypeNamesKeyAndExpectation) {
  expect_config_error([] { Config::parse("train:\n  micro_batch: four\n", "cfg.yaml"); },
                      {"cfg.yaml:2", "'train.micro_batch' expects an integer, got 'four'"});
  expect_config_error([] { Config::parse("train.micro_batch: 1.5\n", "cfg.yaml"); },
                      {"expects an integer"});
  expect_config_error([] { Config::parse("run.metrics: maybe\n", "cfg.yaml"); },
                      {"'run.metrics' expects true or false"});
  expect_config_error([] { Config::parse("train:\n  seq_len: [1, 2]\n", "cfg.yaml"); },
                      {"cfg.yaml:2", "got a list"});
}

TEST(Config, OutOfRangeAndBadChoice) {
  expect_config_error([] { Config::parse("train.micro_batch: 0\n", "cfg.yaml"); },
                      {"'train.micro_batch' = 0 is out of range [1, "});
  expect_config_error([] { Config::parse("log.level: loud\n", "cfg.yaml"); },
                      {"'log.level' = 'loud' is not one of debug | info | warn | error"});
}

TEST(Config, OverrideErrorsNameTheFlag) {
  Config c;
  expect_config_error([&] { c.set("model.d_modle=3"); }, {"--set", "unknown key 'model.d_modle'"});
  expect_config_error([&] { c.set("train.seq_len"); }, {"not of the form key=value"});
}

TEST(Config, MalformedYamlAndMissingFile) {
  expect_config_error([] { Config::parse("train: {seq_len: 3\n", "bad.yaml"); },
                      {"bad.yaml:", "malformed YAML"});
  expect_config_error([] { Config::load("/nonexistent/cfg.yaml"); },
                      {"/nonexistent/cfg.yaml", "cannot open"});
}

TEST(Config, ResolvedYamlRoundTrips) {
  Config c = Config::parse("train:\n  seq_len: 77\ndata.path: x.h5\n", "a.yaml");
  std::string text = c.to_yaml();
  EXPECT_NE(text.find("seq_len: 77  # a.yaml:2"), std::string::npos) << text;
  Config d = Config::parse(text, "resolved.yaml");
  for (const auto& k : moe::config_schema()) {
    switch (k.type) {
      case moe::ConfigType::kInt:
        EXPECT_EQ(d.get_int(k.key), c.get_int(k.key));
        break;
      case moe::ConfigType::kFloat:
        EXPECT_EQ(d.get_float(k.key), c.get_float(k.key));
        break;
      case moe::ConfigType::kBool:
        EXPECT_EQ(d.get_bool(k.key), c.get_bool(k.key));
        break;
      case moe::ConfigType::kString:
        EXPECT_EQ(d.get_string(k.key), c.get_string(k.key));
        break;
    }
  }
}
