// File: product_key.hpp — product-key top-k retrieval (Lample et al. 2019, as used by PEER).
//
// Notation: M query rows (tokens x heads), dk key width (even), h = dk / 2, n sub-keys per half,
// N = n^2 experts (product keys), k results per query.
//
// The N keys are the concatenations [c_i, c'_j] of two sub-key tables C, C' [n, h]; key
// (i, j) has expert id i * n + j and score q . [c_i, c'_j] = q1 . c_i + q2 . c'_j with q1, q2
// the two halves of q. Because the score is a sum of the two halves' scores, the exact top-k
// over all N keys lies in (top-k of q1 . C) x (top-k of q2 . C'), so retrieval costs
// O((n + k^2) dk) per query: two [M, n] GEMMs, two top-k over n, one top-k over k^2 sums. The
// N scores are never materialised.
//
// Order: results are sorted by score, descending; equal scores by smaller expert id (the same
// order a brute force over all N keys gives, which the tests use).
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/tensor.hpp"

namespace moe::model {

// Reusable scratch of product_key_topk (grown once, reused across calls).
struct ProductKeyScratch {
  Tensor s1, s2;  // [M, n] half scores
};

// q [M, dk] (any ld), c1, c2 [n, dk/2] -> ids [M * k] (expert ids i * n + j), scores [M * k]
// (descending per row). Requires 1 <= k <= n. OpenMP over rows (call from serial code).
void product_key_topk(ConstView q, ConstView c1, ConstView c2, int k, ProductKeyScratch& scratch,
                      int32_t* ids, float* scores);

// Reference: scores every one of the N keys (as s1[i] + s2[j], in double) and sorts them. For
// tests only: O(N dk) per query.
void product_key_brute_force(ConstView q, ConstView c1, ConstView c2, int k,
                             std::vector<int32_t>& ids, std::vector<float>& scores);

}  // namespace moe::model
