#include "model/serve/api.hpp"

#include "runtime/error.hpp"

namespace moe::model::serve {

namespace {

using nlohmann::json;

[[noreturn]] void bad(const std::string& message) {
  throw ApiError(400, message);
}

int64_t get_int(const json& j, const char* key, int64_t fallback, int64_t lo, int64_t hi) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  if (!v.is_number_integer()) bad(cat("field '", key, "' must be an integer, got ", v.type_name()));
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi))
    bad(cat("field '", key, "' must be in [", lo, ", ", hi, "]"));
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) bad(cat("field '", key, "' = ", x, " must be in [", lo, ", ", hi, "]"));
  return x;
}

double get_number(const json& j, const char* key, double fallback, double lo, double hi,
                  bool lo_open) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  if (!v.is_number()) bad(cat("field '", key, "' must be a number, got ", v.type_name()));
  const double x = v.get<double>();
  if (!(x <= hi) || (lo_open ? !(x > lo) : !(x >= lo)))
    bad(cat("field '", key, "' = ", x, " must be in ", lo_open ? "(" : "[", lo, ", ", hi, "]"));
  return x;
}

}  // namespace

CompletionParams parse_completion(const std::string& body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad("malformed JSON in the request body");
  if (!j.is_object()) bad(cat("the request body must be a JSON object, got ", j.type_name()));
  CompletionParams p;
  if (!j.contains("prompt")) bad("missing field 'prompt'");
  if (!j["prompt"].is_string())
    bad(cat("field 'prompt' must be a string, got ", j["prompt"].type_name()));
  p.prompt = j["prompt"].get<std::string>();
  if (p.prompt.empty()) bad("field 'prompt' is empty");
  p.max_tokens = get_int(j, "max_tokens", 16, 1, int64_t{1} << 30);
  p.sampling.temperature = get_number(j, "temperature", 1.0, 0.0, 100.0, false);
  p.sampling.top_p = get_number(j, "top_p", 1.0, 0.0, 1.0, true);
  p.sampling.top_k = static_cast<int>(get_int(j, "top_k", 0, 0, int64_t{1} << 24));
  p.sampling.seed = static_cast<uint64_t>(get_int(j, "seed", 0, 0, INT64_MAX));
  if (j.contains("stop") && !j["stop"].is_null()) {
    const json& s = j["stop"];
    if (s.is_string()) {
      p.stop.push_back(s.get<std::string>());
    } else if (s.is_array() && s.size() <= 4) {
      for (const json& e : s) {
        if (!e.is_string()) bad("field 'stop' must be a string or an array of strings");
        p.stop.push_back(e.get<std::string>());
      }
    } else {
      bad("field 'stop' must be a string or an array of up to 4 strings");
    }
    for (const auto& e : p.stop)
      if (e.empty()) bad("field 'stop' holds an empty string");
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean())
      bad(cat("field 'stream' must be a boolean, got ", j["stream"].type_name()));
    p.stream = j["stream"].get<bool>();
  }
  return p;
}

nlohmann::json error_json(int status, const std::string& message) {
  return {{"error",
           {{"message", message},
            {"type", status < 500 ? "invalid_request_error" : "server_error"},
            {"code", status}}}};
}

std::string dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace moe::model::serve
