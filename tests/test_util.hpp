// File: test_util.hpp — small helpers shared by the tests.
#pragma once

#include <cstdint>
#include <random>

#include "runtime/tensor.hpp"

namespace moe::test {

// Fills v row by row with U(-scale, scale) from a seeded mt19937: the same values for the same
// seed and shape on every rank and every run.
inline void randomize(View v, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) v(i, j) = u(rng);
}

}  // namespace moe::test
