// File: test_util.hpp — small helpers shared by the tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

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

// n_seq training windows of seq_len + 1 token ids in [0, vocab), from a seeded mt19937.
inline std::vector<int32_t> random_windows(int64_t n_seq, int64_t seq_len, int64_t vocab,
                                           uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> w(static_cast<size_t>(n_seq * (seq_len + 1)));
  for (auto& t : w) t = static_cast<int32_t>(rng() % vocab);
  return w;
}

// v's values row by row in double: the finite-difference checks' reference type.
inline std::vector<double> to_double(ConstView v) {
  std::vector<double> out;
  for (int64_t i = 0; i < v.rows; ++i)
    for (int64_t j = 0; j < v.cols; ++j) out.push_back(v(i, j));
  return out;
}

// max |analytic - fd| / max |fd| over the elements; fd holds analytic's shape row by row.
inline double grad_error(ConstView analytic, const std::vector<double>& fd) {
  double num = 0.0, den = 1e-12;
  for (int64_t i = 0; i < analytic.rows; ++i)
    for (int64_t j = 0; j < analytic.cols; ++j) {
      double g = fd[static_cast<size_t>(i * analytic.cols + j)];
      num = std::max(num, std::abs(analytic(i, j) - g));
      den = std::max(den, std::abs(g));
    }
  return num / den;
}

}  // namespace moe::test
