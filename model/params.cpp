#include "model/params.hpp"

namespace moe::model {

uint64_t init_stream(const char* tag, int64_t index) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a over the tag
  for (const char* p = tag; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 0x100000001b3ull;
  return mix64(h ^ mix64(static_cast<uint64_t>(index)));
}

void init_uniform(View v, float bound, uint64_t seed, uint64_t stream) {
  const uint64_t base = mix64(seed ^ mix64(stream));
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) {
      uint64_t r = mix64(base + static_cast<uint64_t>(i * v.cols + j));
      // 24 random bits -> [0, 1) exactly representable in fp32, then to [-bound, bound).
      float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);
      v(i, j) = (2.0f * u - 1.0f) * bound;
    }
}

}  // namespace moe::model
