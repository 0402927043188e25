// File: moe_layer.hpp — the expert-parallel Mixture-of-Experts FFN layer.
//
// Notation: T tokens on this rank, d model width, f FFN width, E experts, E_l experts on this
// rank, k slots per token, P ranks, R rows this rank's experts receive.
//
// Forward, in named stages (each collective stands alone; local work before/after it):
//   route    router.forward(x)                    -> per token k (expert, weight) slots
//   plan     DispatchPlan::build                   -> order, counts, capacity drops
//   dispatch exchange.dispatch(x)                  -> xin [R, d] grouped by local expert
//   experts  bank.forward(xin)                     -> yout [R, d]
//   combine  exchange.combine(yout)                -> slot_out [T*k, d];  y_t = sum_j w_tj slot_out
// Backward, in reverse:
//   combine^T  ds_tj = w_tj dy_t -> exchange.dispatch_slots -> dyin [R, d];
//              dweight_tj = <dy_t, slot_out_tj>
//   experts^T  bank.backward(dyin) -> dxin [R, d]   (expert gradients stay on this rank)
//   dispatch^T exchange.combine(dxin) -> [T*k, d], summed per token -> dx
//   route^T    router.backward(dweight) -> dx += ..., dW_r
// Dropped or empty slots contribute zero (the token keeps its residual outside this layer).
// k is the routing's slots per token (RouteResult::k: top_k for top-k routers; for expert
// choice, the most experts any local token got).
//
// Routers (model.moe.router, make_router): topk, topk_bias (TopKRouter with loss-free bias
// balancing) and expert_choice (ExpertChoiceRouter; the router applies the capacity, so the
// plan is built dropless). Shared experts (model.moe.shared_experts = n > 0): n always-on FFN
// experts of width f, run on every rank on its own tokens and added to the routed output,
//   y_t = sum_j w_tj expert_j(x_t) + sum_{s<n} ffn_s(x_t),
// computed as one dense Ffn of width n f (the sum of n FFNs is one FFN with their hidden units
// side by side). Their parameters are replicated like the router's (replicated_params()).
//
// Exchange (comm.exchange): the MPI path above copies rows into the layer's own xin_ / yout_
// buffers. When every rank is on one node and pipeline_chunks is 1, the node-local shared path
// (Exchange::*_shared) moves each row once, straight into its final place, and the experts read
// and write the exchange's windows:
//   forward   xin = ex_dispatch.dispatch_shared(x); yout = ex_dispatch.combine_buffer();
//             experts(xin -> yout); ex_dispatch.combine_shared(slot_out)
//   backward  dyin = ex_combine.dispatch_slots_shared(ds); dxin = ex_combine.combine_buffer();
//             experts^T(dyin -> dxin); ex_combine.combine_shared(dslot)
// Backward uses the other Exchange because the experts' backward still reads the forward's
// xin, which lives in ex_dispatch's input window until its next dispatch_shared (the next
// forward). The results are bitwise those of the MPI path.
// The hierarchical path (comm.exchange hierarchical) is the MPI path above with the exchanges
// set to comm::ExchangeAlgorithm::kHierarchical: within the node, then across nodes; also
// bitwise equal.
//
// Modes: dropless (capacity_factor 0, default) or capacity; pipeline_chunks > 1 splits the
// local tokens into chunks and overlaps the exchange of chunk i+1 with the experts of chunk i
// (Exchange *_start/*_wait), in forward and backward. Capacity drops are decided once on the
// whole batch; the chunks then carry the dropped slots as empty (-1), so pipelined and
// unpipelined results are the same.
//
// Every method except the accessors is collective over the layer's communicator: every rank
// calls it, in the same order, also with T = 0.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/exchange.hpp"
#include "comm/placement.hpp"
#include "comm/plan.hpp"
#include "model/experts.hpp"
#include "model/layers/ffn.hpp"
#include "model/routers/router.hpp"
#include "runtime/config.hpp"

namespace moe::model {

// How the layer moves rows (`comm.exchange`). With pipeline_chunks 1, kAuto = kShared when every
// rank is on one node, else kHierarchical when there are several nodes of several ranks each
// (the same number on every node), else kAlltoallv; pipelined layers use kAlltoallv. Nodes come
// from MPI or from `comm.ranks_per_node` (comm::NodeLayout).
enum class ExchangeMode { kAuto, kAlltoallv, kShared, kHierarchical };
// "auto" | "alltoallv" | "shared" | "hierarchical"
ExchangeMode parse_exchange_mode(const std::string& name);
const char* exchange_mode_name(ExchangeMode m);

// model.moe.router.
enum class RouterKind { kTopK, kTopKBias, kExpertChoice, kSingleGate /* model/single_gate */ };
RouterKind parse_router_kind(const std::string& name);  // "topk" | "topk_bias" | "expert_choice"
const char* router_kind_name(RouterKind r);

// The `model.moe.*` configuration block and `comm.exchange` (runtime/config.cpp documents every
// key).
struct MoeConfig {
  int n_experts = 8;
  int top_k = 2;
  int64_t d_ff = 2048;
  Activation activation = Activation::kGelu;
  bool renormalize = true;
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.001;
  bool global_balance = true;    // model.moe.aux_loss_scope: global (true) or rank
  double capacity_factor = 0.0;  // 0 = dropless
  int pipeline_chunks = 1;       // 1 = off
  ExchangeMode exchange = ExchangeMode::kAuto;
  int ranks_per_node = 0;  // comm.ranks_per_node: 0 = detect, N > 0 = blocks of N ranks
  RouterKind router = RouterKind::kTopK;
  double bias_update_rate = 1e-3;  // topk_bias: gamma
  int shared_experts = 0;          // always-on experts of width d_ff, replicated
  double router_skew = 0.0;        // bench.router_skew (top-k routers; benchmark only)

  static MoeConfig from(const Config& config);
};

// Per-call load statistics for the training loop's metrics (identical on every rank except
// the exchange figures, which are this rank's).
struct MoeLoadStats {
  comm::LoadStats load;          // kept slots per expert / rank, drops, imbalance (global)
  double load_balance_loss = 0;  // unweighted, global
  double z_loss = 0;             // unweighted, global
  double aux_loss = 0;           // weighted, what enters the loss
  std::vector<double> prob_sum;  // [E] router probability summed over the global batch
  int64_t bytes_sent = 0;        // this rank, this forward + backward
  int64_t bytes_received = 0;
  double exchange_seconds = 0.0;  // this rank, inside exchange calls
  double expert_seconds = 0.0;    // this rank, inside ExpertBank forward + backward
};

// The combine's local part, shared by the MoE layer and UMoE attention: y_t = sum over kept
// slots s = t k + j of w_s slot_out_s (a token with no kept slot gets a zero row).
// slot_out [T*k, d], w and kept [T*k], y [T, d].
void combine_weighted(ConstView slot_out, const float* w, const std::vector<uint8_t>& kept, int k,
                      View y);

// combine^T, local part shared by the MoE layer and UMoE attention: for slot s = t k + j,
// dweight(t, j) = <dy_t, slot_out_s> and ds_s = w_s dy_t; a slot that is not kept gets 0 and a
// zero row. dy [T, d], slot_out [T*k, d], w and kept [T*k], dweight [T, k], ds [T*k, d].
void combine_transpose(ConstView dy, ConstView slot_out, const float* w,
                       const std::vector<uint8_t>& kept, int k, View dweight, View ds);

class MoeLayer {
 public:
  // The placement must have config.n_experts experts over comm.size() ranks. Weights come
  // from seed: router replicated, experts by global id. Collective (it resolves
  // config.exchange: comm.exchange = shared on ranks that are not all on one node, shared or
  // hierarchical with pipeline_chunks > 1, hierarchical on nodes of different sizes, or a
  // ranks_per_node that does not divide the rank count is an Error(kConfig)).
  MoeLayer(std::string name, int64_t d_model, const MoeConfig& config,
           const comm::ExpertPlacement& placement, const comm::Communicator& comm, uint64_t seed);
  // The same over a borrowed ExpertBank (UMoE: the block's attention owns the experts and this
  // FFN layer runs the same ones; model.moe.share_attention_ffn). The bank must outlive the
  // layer and match config (d_ff, activation, this rank's experts). Its gradients accumulate
  // from both users; params() and zero_grad() leave it to its owner.
  MoeLayer(std::string name, int64_t d_model, const MoeConfig& config,
           const comm::ExpertPlacement& placement, const comm::Communicator& comm, uint64_t seed,
           ExpertBank& shared_bank);

  // x [T, d] -> y [T, d]. x must stay valid until backward(). Collective.
  void forward(ConstView x, View y);
  // Inference (decoding): the y of forward() with fewer synchronisations and no backward to
  // follow: the router's statistics stay local (no all-reduce; stats().load is still global,
  // from the plan), the pipeline is off, and on the shared path the next step's dispatch skips
  // its first barrier. Collective.
  void infer(ConstView x, View y);
  // Packs the local experts' weights for infer() (ExpertBank::pack_for_inference): from then
  // on infer() runs the experts on the packed copies. Call again after the weights change.
  // kBf16 rounds the experts' weights to bf16 in place and packs bf16 panels.
  void pack_for_inference(WeightType weights = WeightType::kFp32);
  // dy [T, d] -> dx [T, d] (overwritten). aux_scale multiplies the router's auxiliary loss in
  // the total loss. ACCUMULATES the router and expert gradients. Collective.
  void backward(ConstView dy, View dx, float aux_scale = 1.0f);

  const MoeLoadStats& stats() const { return stats_; }
  double aux_loss() const { return stats_.aux_loss; }
  const RouteResult& route() const { return route_; }
  // The last forward's input x [T, d] (borrowed: valid while the caller's buffer is), e.g. to
  // recompute router logits for expert profiling (model/prune.hpp).
  ConstView input() const { return x_; }
  // The last forward's whole-batch plan (kept() tells which slots survived capacity).
  const comm::DispatchPlan& plan() const { return plan_; }
  Router& router() { return *router_; }
  ExpertBank& experts() { return *experts_; }
  const comm::ExpertPlacement& placement() const { return placement_; }
  // Re-placement (model/rebalance.hpp): from now on the layer runs `bank`, which must hold
  // next.local_experts(rank) in slot order (replica slots flagged). Only for a layer that owns
  // its experts. Local; every rank must switch to the same map before the next forward.
  void replace_experts(const comm::ExpertPlacement& next, std::unique_ptr<ExpertBank> bank);
  bool owns_experts() const { return own_experts_ != nullptr; }
  const MoeConfig& config() const { return config_; }
  // The path config.exchange resolved to: kShared, kHierarchical or kAlltoallv.
  ExchangeMode exchange() const { return mode_; }
  // The shared experts (nullptr without them).
  Ffn* shared_experts() { return shared_ffn_.get(); }
  // Router and shared-expert parameters are replicated (all-reduce their gradients over data
  // parallel ranks); expert parameters live only here. Names are relative ("router.w",
  // "shared.w1"); params() is both, prefixed with the layer's name.
  std::vector<ParamRef> replicated_params();
  std::vector<ParamRef> params();
  // Replicated non-trained state for the checkpoint (Router::buffers()), relative names.
  std::vector<std::pair<std::string, View>> buffers() { return router_->buffers(); }
  // After each optimiser step (Router::end_step). Local.
  void end_step(bool applied) { router_->end_step(applied); }
  void zero_grad();

 private:
  struct Chunk {
    int64_t t0 = 0, nt = 0;        // token range [t0, t0 + nt)
    int64_t r0 = 0;                // first row in the [R, d] buffers
    std::vector<int32_t> expert;   // [nt, k] chunk routing, dropped slots as -1 (pipelined)
    comm::DispatchPlan plan;       // token rows -> experts (forward)
    comm::DispatchPlan slot_plan;  // slot rows -> experts (backward, pipelined only)
    ExpertCache cache;
    int64_t n_recv() const { return plan.recv_offsets().back(); }
  };
  void run_forward(ConstView x, View y, bool inference);
  // The local experts on the received rows: the packed weights when inferring after
  // pack_for_inference(), else forward() with chunks_[0].cache.
  void run_experts(ConstView xin, View yout, bool inference);
  void combine_weighted(View y) const;
  void shared_forward(ConstView x, View y);  // y += shared experts(x)
  void record_forward_stats(const comm::ExchangeStats& s0, const comm::ExchangeStats& s1,
                            double expert_s);

  std::string name_;
  int64_t d_;
  MoeConfig config_;
  comm::ExpertPlacement placement_;  // a copy: plain data
  const comm::Communicator& comm_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<Ffn> shared_ffn_;               // shared experts, or nullptr
  std::unique_ptr<ExpertBank> own_experts_;       // nullptr when borrowed
  ExpertBank* experts_;                           // own_experts_ or the borrowed bank
  comm::Exchange ex_dispatch_, ex_combine_;       // two, so a dispatch and a combine can overlap
  bool shared_ = false;                           // node-local shared-window path (see the top)
  ExchangeMode mode_ = ExchangeMode::kAlltoallv;  // resolved comm.exchange

  // Cache of the last forward.
  ConstView x_;  // [T, d] borrowed input
  RouteResult route_;
  comm::DispatchPlan plan_;    // whole batch: drops and load statistics
  std::vector<Chunk> chunks_;  // 1 (unpipelined) or pipeline_chunks
  Tensor xin_;                 // [R, d] expert input rows (experts' cache); MPI path only
  Tensor yout_;                // [R, d] expert output rows; dL/dyout in backward; MPI path only
  Tensor slot_out_;            // [T*k, d] expert output per slot (kept for dweight)
  Tensor slot_grad_;           // [T*k, d] backward: w-scaled dy per slot, then dL/dx per slot
  Tensor dweight_;             // [T, k]
  Tensor shared_buf_;          // [T, d] shared experts' output; their dx in backward
  MoeLoadStats stats_;
};

}  // namespace moe::model
