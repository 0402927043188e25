// File: api.hpp — the HTTP API's JSON: completion requests in, completions and errors out.
//
// POST /v1/completions takes {"prompt": string (required), "max_tokens": int >= 1 (16),
// "temperature": number in [0, 100] (1; 0 = greedy), "top_p": number in (0, 1] (1),
// "top_k": int >= 0 (0 = all), "seed": int >= 0 (0), "stop": string or array of up to 4
// non-empty strings, "stream": bool (false)}. Unknown fields are ignored, as LLM servers do.
// Parsing is nlohmann-json's; this file only checks types and ranges.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/generate.hpp"

namespace moe::model::serve {

// A client error: the HTTP status (4xx) and a message for {"error": {...}}.
struct ApiError : std::runtime_error {
  ApiError(int status, const std::string& message) : std::runtime_error(message), status(status) {}
  int status;
};

struct CompletionParams {
  std::string prompt;
  int64_t max_tokens = 16;
  SampleOptions sampling;
  std::vector<std::string> stop;
  bool stream = false;
};

// Parses and checks a request body. Throws ApiError(400) naming the field on any problem.
CompletionParams parse_completion(const std::string& body);

// {"error": {"message": ..., "type": "invalid_request_error" | "server_error", "code": status}}
nlohmann::json error_json(int status, const std::string& message);

// JSON text that never throws on invalid UTF-8 (bytes a byte tokenizer split are replaced).
std::string dump(const nlohmann::json& j);

}  // namespace moe::model::serve
