// File: hash.hpp — the counter-based hash behind every seeded stream (data windows, weights).
#pragma once

#include <cstdint>

namespace moe {

// splitmix64's finaliser: a bijective 64-bit mix; mix64(seed ^ counter) gives independent-looking
// values for consecutive counters, so streams need no state and no rank sees another's draws.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace moe
