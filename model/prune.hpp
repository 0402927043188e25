// File: prune.hpp — task-aware offline pruning and merging of the experts of a trained MoE
// checkpoint (UNCURL, Sarkar et al. 2024): fewer experts, a smaller All2All.
//
// Notation: E experts of a layer before, E' after (the target), T task tokens (over all ranks),
// d model width, f expert FFN width, f1 = f (GELU) or 2f (SwiGLU), k slots per token, P ranks.
//
// Per MoE layer:
//   profile   expert i's router logits over the task tokens: column i of x W_r, [T] per expert.
//             Softmax is invariant to a per-token shift, so each token's logits are centred
//             over the experts first; two experts are alike when their centred profiles point
//             the same way (cosine similarity).
//   frequency expert i's routed slots over the task tokens (top-k choices, global).
//   cluster   spectral clustering of the E experts into E' groups (spectral_cluster below).
//   merge     within a group: align each member's hidden neurons to the reference (the most
//             frequent member, ties to the lower id) by an exact linear assignment on the dot
//             products of first-layer weights (align_neurons), then average the aligned W1, W2
//             weighted by routing frequency (uniformly when the group got no tokens). The router
//             column of the merged expert is the same frequency-weighted mean of the members'
//             router columns: a merged expert is chosen where its members were, with a logit
//             between theirs.
// Methods: merge (as above), merge-noalign (no alignment), frequency (keep the E' most routed
// experts, ties to the lower id, drop the rest and their router columns). New expert ids follow
// the smallest original id of each group (frequency: the kept experts in id order), so E' = E
// gives back the original model exactly.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "model/experts.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

enum class PruneMethod { kMerge, kMergeNoAlign, kFrequency };
PruneMethod parse_prune_method(const std::string& name);  // merge | merge-noalign | frequency
const char* prune_method_name(PruneMethod m);

// Spectral clustering of n items into k groups from their profiles [n, T] (row i = item i):
//   1. centre each column (token) over the n items; cosine similarity c_ij of the rows;
//      distance D_ij = 1 - c_ij (0 for identical directions, up to 2)
//   2. affinity A_ij = exp(-D_ij^2 / (s_i s_j)), A_ii = 1, with local scaling s_i = distance
//      of item i to its m-th nearest neighbour, m = max(1, ceil(n / k) - 1) (the other
//      members of a group of the expected size), floored at 1e-6
//   3. normalised Laplacian L = I - D^-1/2 A D^-1/2 (Eigen's self-adjoint solver); the
//      eigenvectors of its k smallest eigenvalues as rows U [n, k], each row normalised to
//      unit length (Ng, Jordan, Weiss 2002)
//   4. k-means on the rows of U: k-means++ seeding from std::mt19937_64(seed), Lloyd
//      iterations, 8 restarts, the lowest inertia wins; no group is left empty.
// Returns group[i] in [0, k), groups numbered by their smallest member. k == n: every item its
// own group; k == 1: one group. Deterministic for a seed. Local (no communication).
std::vector<int> spectral_cluster(const std::vector<float>& profiles, int n, int64_t T, int k,
                                  uint64_t seed);

// Exact minimum-cost assignment of an n x n cost matrix (row-major): returns col[i], the
// column assigned to row i, a permutation. Hungarian algorithm with potentials (shortest
// augmenting paths), O(n^3) time in the worst case, O(n^2) memory. Measured for align_neurons
// on unrelated random experts (d 256, one thread, loaded 2-core machine): f 1024 0.2 s,
// f 2048 1.0 s per expert pair.
std::vector<int> hungarian(const std::vector<double>& cost, int n);

// Hidden-neuron alignment of expert b to reference expert a (both W1 [d, f1], W2 [f, d]):
// returns perm with perm[j] = the neuron of b matched to neuron j of a, maximising the summed
// dot products of first-layer weights (neuron j: column j of W1; SwiGLU: columns j and f + j).
std::vector<int> align_neurons(ConstView w1_a, ConstView w1_b, Activation act);

// Applies perm to an expert: w1_out column j (and f + j) = w1 column perm[j]; w2_out row j =
// w2 row perm[j]. The expert computes the same function.
void permute_neurons(ConstView w1, ConstView w2, const std::vector<int>& perm, Activation act,
                     View w1_out, View w2_out);

// One layer's plan: which old experts make up each new expert and with which weights.
struct MergeGroup {
  std::vector<int> members;     // old global ids, ascending
  std::vector<double> weights;  // [members] frequency weights, summing to 1
  int reference = -1;           // the member the others are aligned to (merge)
};
struct LayerPlan {
  int layer = 0;
  std::vector<MergeGroup> groups;  // [E'] new expert id = index
};
LayerPlan plan_layer(int layer, const std::vector<float>& profiles, int n_experts, int64_t T,
                     const std::vector<int64_t>& frequency, int target, PruneMethod method,
                     uint64_t seed);

// Merges one group's experts (W1 [d, f1], W2 [f, d] of each member, in members order) into
// w1_out, w2_out per the method (merge: aligned to the reference first).
void merge_group(const MergeGroup& g, const std::vector<ConstView>& w1s,
                 const std::vector<ConstView>& w2s, Activation act, PruneMethod method, View w1_out,
                 View w2_out);

// Router columns of the new experts: w_out[:, g] = sum_m weights_m w[:, members_m].
// w [d, E] -> w_out [d, E'].
void merge_router(ConstView w, const LayerPlan& plan, View w_out);

// All2All traffic of one MoE layer per decode step with n_tokens tokens (one per sequence) all
// on rank 0, as in moe-generate and moe-serve: every slot row goes out (dispatch) and comes
// back (combine), k d 4 bytes each way; rows for experts on rank 0 stay local.
struct DecodeTraffic {
  int ranks_with_experts = 0;  // min(P, E) with the blocked placement
  double bytes_all = 0;        // 2 n k d 4: every slot, local ones included
  double bytes_remote = 0;     // expected, with the task's routing frequencies
  int messages = 0;            // 2 (ranks_with_experts - 1): one per peer and direction
};
DecodeTraffic decode_traffic(int64_t n_tokens, int k, int64_t d, int n_ranks,
                             const std::vector<int64_t>& frequency);

struct PruneOptions {
  std::string checkpoint;  // input: checkpoint root or step directory
  std::string task_data;   // HDF5 token file (moe-data)
  std::string split = "train";
  std::string output;       // checkpoint root to write
  int target = 0;           // E'
  std::vector<int> layers;  // blocks to prune (MoE blocks); empty: every MoE block
  PruneMethod method = PruneMethod::kMerge;
  uint64_t seed = 0;
  int64_t tokens = 4096;      // task tokens to profile (rounded up to whole windows)
  int64_t decode_tokens = 1;  // tokens per decode step for the traffic report
};

struct PruneReport {
  std::vector<LayerPlan> plans;                 // [MoE layers]: groups.size() = new count
  std::vector<std::vector<int64_t>> frequency;  // [MoE layers][E of the layer]
  int64_t tokens = 0;                           // task tokens profiled
  double task_loss = 0;                         // mean cross-entropy of the model on them
  std::string written;                          // the step directory written
};

// Loads the checkpoint, runs the task tokens through it (expert parallel, any P), plans every
// MoE layer (options.layers: only those blocks; the others keep all their experts, routers and
// optimiser state: an identity plan in the report), merges on rank 0 and writes a checkpoint
// with E' experts per pruned MoE layer (step kept; model.moe.num_experts = E' when every MoE
// layer ends with E' experts, else model.moe.layer_experts lists the counts per MoE block and
// num_experts is the largest). Optimiser state: tensors whose values did not
// change keep theirs (dense tensors, experts kept unchanged); pruned routers and merged experts
// start afresh (m = v = 0, step 0). Collective; every rank throws the same Error on bad input:
// a dense checkpoint, a target outside [max(top_k, 1), E] of a pruned block, a listed block
// that is not an MoE block, task data with another vocabulary, an output that is the input. Rank 0
// holds every expert of the model while merging.
PruneReport prune_checkpoint(const PruneOptions& options, const comm::Communicator& comm);

// Mean cross-entropy of a checkpoint on the same task windows prune_checkpoint profiles
// (options.task_data, split, tokens, seed). Collective; the experts of every MoE layer must
// cover the ranks (E >= P).
double task_loss(const std::string& checkpoint, const PruneOptions& options,
                 const comm::Communicator& comm);

}  // namespace moe::model
