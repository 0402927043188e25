// File: experts.hpp — ExpertBank: this rank's FFN experts, run on expert-grouped rows.
//
// Notation: d model width, f FFN width, E_l experts on this rank, R rows received (all local
// experts together), f1 = f (GELU) or 2f (SwiGLU: gate and up side by side).
//
//   GELU:    y = gelu(x W1) W2                       W1 [d, f],  W2 [f, d]
//   SwiGLU:  y = (silu(x Wg) * (x Wu)) W2            W1 = [Wg | Wu] [d, 2f], W2 [f, d]
// GELU is the erf form 0.5 h (1 + erf(h / sqrt 2)), as torch.nn.GELU() by default, with erf
// from a vectorisable approximation (absolute error < 1.5e-7, see experts.cpp). No biases (as in
// Switch, GShard and Mixtral experts).
//
// Rows are grouped by local expert: expert e owns rows [offsets[e], offsets[e+1]). The work is
// split into (expert, row block) tasks, largest first, over an OpenMP team; each GEMM inside
// runs on one BLIS thread, so both cores stay busy when experts are uneven. Weight gradients
// are split by (expert, column block of f) instead, so no two threads write the same gradient
// element and the result does not depend on the thread count's scheduling.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/params.hpp"
#include "runtime/gemm.hpp"
#include "runtime/tensor.hpp"

namespace moe::model {

enum class Activation { kGelu, kSwiglu };

Activation parse_activation(const std::string& name);  // "gelu" | "swiglu"
const char* activation_name(Activation a);

// What one forward keeps for its backward. One per in-flight forward (the pipelined MoE layer
// keeps one per chunk); buffers grow once and are reused across steps.
struct ExpertCache {
  ConstView x;                   // [R, d] borrowed input rows
  std::vector<int64_t> offsets;  // [E_l + 1]
  Tensor h;                      // [R, f1] pre-activation; backward overwrites it with dL/dh
  Tensor a;                      // [R, f] activation (input of W2)
};

class ExpertBank {
 public:
  // global_ids: the global expert id of each local slot (placement.local_experts(rank)).
  // Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from (seed, global id): the same expert
  // has the same weights on any rank count.
  ExpertBank(int64_t d_model, int64_t d_ff, Activation activation, std::vector<int> global_ids,
             uint64_t seed);

  int64_t d_model() const { return d_; }
  int64_t d_ff() const { return f_; }
  int n_local() const { return static_cast<int>(global_ids_.size()); }
  Activation activation() const { return act_; }
  const std::vector<int>& global_ids() const { return global_ids_; }
  // Which local slots are replicas of an expert whose primary lives elsewhere (all false unless
  // set; see ParamRef::replica). [E_l]
  void set_replicas(std::vector<uint8_t> replica);
  bool is_replica(int e) const { return !replica_.empty() && replica_[static_cast<size_t>(e)]; }

  // x [R, d] rows grouped by offsets [E_l + 1] -> y [R, d]. Fills cache; x must stay valid
  // until backward(). Local; OpenMP inside (call from serial code).
  void forward(ConstView x, const std::vector<int64_t>& offsets, View y, ExpertCache& cache);
  // Inference: W1 and W2 of every local expert packed for gemm_packed (runtime/gemm.hpp).
  // Call again after the weights change (the packed copies do not follow them). kBf16 first
  // rounds W1 and W2 to bf16 in place (round_to_bf16(), for good: forward() then computes on
  // the same values) and packs bf16 panels, half the bytes of fp32 ones.
  void pack_for_inference(WeightType weights = WeightType::kFp32);
  bool packed_for_inference() const { return !packed1_.empty(); }
  // Rounds every local W1 and W2 to the nearest bf16 value, in place (kept in fp32). Local.
  void round_to_bf16();
  // forward()'s y from the packed weights, without a backward cache. Each row's result
  // depends on that row and its expert only (not on how many rows the call has), so a
  // sequence decodes the same whatever batch it shares a step with. Local; OpenMP inside.
  void infer(ConstView x, const std::vector<int64_t>& offsets, View y);
  // dy [R, d] -> dx [R, d] (overwritten; may alias the forward input x). ACCUMULATES dW1, dW2.
  // Consumes the cache (h is overwritten).
  void backward(ConstView dy, View dx, ExpertCache& cache);

  // Matrices of local slot e: W1 [d, f1], W2 [f, d] and their gradients.
  View w1(int e) { return w1_.slab(e); }
  View w2(int e) { return w2_.slab(e); }
  View dw1(int e) { return dw1_.slab(e); }
  View dw2(int e) { return dw2_.slab(e); }
  // Named by global id: "expert.<id>.w1" ([Wg | Wu] for SwiGLU), "expert.<id>.w2"; replica
  // slots are flagged (ParamRef::replica).
  std::vector<ParamRef> params();
  void zero_grad();

  // FLOPs of forward + backward GEMMs for R rows: 2 (d f1 + f d) R x 3.
  double flops_fwd_bwd(int64_t rows) const;

 private:
  struct Task {
    int e;
    int64_t begin, n;  // rows (forward, backward dx) or columns of f (weight gradients)
  };
  std::vector<Task> row_tasks(const std::vector<int64_t>& offsets) const;
  std::vector<Task> col_tasks(const std::vector<int64_t>& offsets) const;

  int64_t d_, f_, f1_;
  Activation act_;
  std::vector<int> global_ids_;             // [E_l]
  std::vector<uint8_t> replica_;            // [E_l] or empty (no replicas)
  Tensor w1_, dw1_;                         // [E_l, d, f1]
  Tensor w2_, dw2_;                         // [E_l, f, d]
  std::vector<Tensor> scratch_;             // per thread: [block rows, f] dL/da
  std::vector<PackedB> packed1_, packed2_;  // [E_l] W1, W2 packed (pack_for_inference)
  Tensor h_infer_, a_infer_;                // [R, f1], [R, f] infer() scratch
};

}  // namespace moe::model
