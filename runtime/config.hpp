// File: config.hpp — the YAML configuration: one schema, typed values, file:line errors.
//
// The schema (config_schema()) is data: every key with its type, default, allowed range or
// choices and a one-line doc. Validation, `--set key=value` overrides, the resolved config that
// is printed and stored with every run, and the README's table all come from it.
//
// A config file is nested YAML (`model: {d_model: 256}`) or dotted keys; both name the same
// flat key `model.d_model`. Unknown keys, wrong types and out-of-range values throw an Error of
// kind kConfig that names the file, the line and the key.
//
// Parsing is pure and local: every rank parses the same file identically before the first
// collective, so every rank fails the same way on a bad config.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace moe {

enum class ConfigType { kInt, kFloat, kBool, kString };

struct ConfigKey {
  std::string key;  // dotted name, e.g. "model.d_model"
  ConfigType type;
  std::string default_value;         // as YAML text
  double min = 0, max = 0;           // inclusive range for numbers (min == max == 0: unbounded)
  std::vector<std::string> choices;  // allowed values for strings (empty: any)
  std::string doc;
};

const std::vector<ConfigKey>& config_schema();
const ConfigKey* find_config_key(const std::string& key);
const char* config_type_name(ConfigType type);

using ConfigValue = std::variant<int64_t, double, bool, std::string>;

class Config {
 public:
  // Defaults for every key.
  Config();
  // Loads a YAML file (path may be empty: defaults only), then applies overrides "key=value" in
  // order. Throws Error(kConfig) naming the file, line and key on any problem.
  static Config load(const std::string& path, const std::vector<std::string>& overrides = {});
  // Parses YAML text; `source` names it in errors.
  static Config parse(const std::string& yaml_text, const std::string& source);

  // Applies one "key=value" override (value parsed as a YAML scalar).
  void set(const std::string& assignment, const std::string& source = "--set");

  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  // Where a value came from: "default", "file.yaml:12" or "--set".
  const std::string& origin(const std::string& key) const;

  // The resolved configuration as nested YAML, every key, in schema order.
  std::string to_yaml() const;

 private:
  void assign(const std::string& key, const std::string& text, const std::string& where);
  struct Entry {
    ConfigValue value;
    std::string origin;
  };
  const Entry& entry(const std::string& key, ConfigType type) const;
  std::map<std::string, Entry> values_;
};

// The schema as a Markdown table (key, type, default, range, doc): the README's reference.
std::string config_schema_markdown();

}  // namespace moe
