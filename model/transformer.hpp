// File: transformer.hpp — the decoder-only MoE Transformer: forward, backward, parameters.
//
// Notation: B sequences of this rank's micro-batch, T positions, N = B*T tokens, d model width,
// V vocabulary, L blocks, E experts.
//
//   x = embed(ids)                                    token embedding; positions by RoPE
//   block l:  x += attention(rms_norm(x))             causal MHA, fused QKV
//             x += ffn_l(rms_norm(x))                 MoE layer when (l + 1) % every_n == 0,
//                                                     else a dense FFN (every_n = 0: all dense)
//   loss = cross_entropy(lm_head(rms_norm(x)), targets) / normaliser  + sum_l aux_l
// The LM head is tied to the embedding or not (model.tie_embeddings). The normaliser is the
// GLOBAL number of target tokens of the optimiser step, so that summing the ranks' losses over
// the accumulation steps gives the step's mean loss on any rank count.
//
// Parameters come in two kinds: dense ones (embedding, norms, attention, dense FFNs, routers,
// shared experts, head), replicated on every rank and averaged over ranks; and experts, owned by
// one rank each and named by their GLOBAL id ("blocks.3.moe.expert.17.w1"), so checkpoints do not
// depend on the rank count.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "comm/placement.hpp"
#include "model/layers/attention.hpp"
#include "model/layers/embedding.hpp"
#include "model/layers/ffn.hpp"
#include "model/layers/lm_head.hpp"
#include "model/layers/moe_layer.hpp"
#include "model/layers/peer.hpp"
#include "model/layers/rms_norm.hpp"
#include "model/layers/umoe_attention.hpp"
#include "runtime/config.hpp"

namespace moe::model {

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t d_model = 256;
  int n_layers = 4;
  int n_heads = 4;
  int64_t d_ff = 1024;  // dense FFN width
  Activation activation = Activation::kGelu;
  bool tie_embeddings = true;
  float norm_eps = 1e-5f;
  double rope_base = 10000.0;
  int moe_every_n = 1;  // 0: dense model (also when model.moe.kind is peer)
  MoeConfig moe;
  // model.moe.layer_experts: [n_layers] experts of each MoE block (0 elsewhere); empty (the
  // default, and configs built in code): every MoE block has moe.n_experts. Read experts(l).
  std::vector<int> layer_experts;
  int peer_layer = -1;  // model.moe.kind peer: the block whose FFN is PEER (resolved), else -1
  PeerConfig peer;
  // model.attention = umoe: every block's attention is a UmoeAttention over experts of
  // model.moe.* (its own bank, or with share_attention_ffn the bank the block's MoE FFN runs).
  bool umoe_attention = false;
  bool share_attention_ffn = false;  // model.moe.share_attention_ffn
  UmoeConfig umoe;

  // Reads model.* from the config; vocab_size 0 there means data_vocab. Throws kConfig errors
  // naming the keys (heads not dividing d_model, a vocabulary smaller than the data's, ...).
  static ModelConfig from(const Config& config, int64_t data_vocab);
  bool is_moe(int layer) const { return moe_every_n > 0 && (layer + 1) % moe_every_n == 0; }
  bool is_peer(int layer) const { return layer == peer_layer; }
  int n_moe_layers() const;
  // Experts of MoE block `layer` (moe.n_experts unless model.moe.layer_experts sets them).
  int experts(int layer) const {
    return layer_experts.empty() ? moe.n_experts : layer_experts[static_cast<size_t>(layer)];
  }
  // The fewest experts of any MoE block (moe.n_experts when there is none): the most ranks
  // expert parallelism can use.
  int min_experts() const;
  // moe with n_experts = experts(layer): the configuration of MoE block `layer`.
  MoeConfig moe_for(int layer) const;
  // Parameters per token that a forward touches (top_k of the E experts), excluding the
  // embedding table (the reference's N_active): 6 N_active + 12 L T d FLOPs per token.
  double active_params() const;
  double flops_per_token(int64_t seq_len) const;
};

// Per-step figures of the MoE layers (summed over layers; rank-local timings).
struct ModelStats {
  double aux_loss = 0;           // weighted, global
  double load_balance_loss = 0;  // unweighted, summed over layers
  double z_loss = 0;             // unweighted, summed over layers
  double expert_imbalance = 0;   // max over layers of max/mean expert load
  double drop_rate = 0;          // dropped / routed slots over all layers
  double exchange_seconds = 0;   // this rank, inside All2All
  int64_t bytes_sent = 0;
};

// Bytes of the activations the model keeps between forward and backward (buffer capacities,
// this rank), by kind. MoE layers and dense FFNs are not itemised (the rest of the tensor peak).
struct ActivationBytes {
  int64_t attention_probs = 0;  // causal tiles of the probabilities, all blocks
  int64_t attention_qkv = 0;    // q, k, v and head outputs, all blocks
  int64_t streams = 0;          // residual stream per block, norm outputs, block outputs
  int64_t head = 0;             // logits / dlogits [N, V]
  int64_t total() const { return attention_probs + attention_qkv + streams + head; }
};

// One sequence's decoding state: a KV cache per block, preallocated to `capacity` positions.
struct SequenceCache {
  std::vector<KvCache> layers;  // [L]
  int64_t len() const { return layers.empty() ? 0 : layers[0].len; }
  int64_t capacity() const { return layers.empty() ? 0 : layers[0].capacity(); }
  void clear() {
    for (auto& c : layers) c.len = 0;
  }
};

class Transformer {
 public:
  // Collective over comm (MoE layers). Weights from seed; experts placed in contiguous blocks.
  Transformer(const ModelConfig& config, const comm::Communicator& comm, uint64_t seed);
  ~Transformer();

  // windows [B, T + 1] (inputs are the first T, targets the last T of each) -> this rank's
  // loss: sum of its targets' cross-entropy / normaliser. Keeps what backward needs.
  // Collective (MoE layers): every rank calls, also with B = 0.
  double forward(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len,
                 double normaliser);
  // ACCUMULATES every gradient. aux_scale multiplies the MoE auxiliary losses in the total loss
  // (1 / accumulation steps). on_dense_ready(i) is called once dense_params()[i].grad is final
  // for this micro-step, in the order of dense_params(). Collective.
  void backward(float aux_scale, const std::function<void(size_t)>& on_dense_ready = {});

  // Logits of the last position of each sequence, for generation: ids [B, T] -> [B, V] view
  // valid until the next call. Collective.
  ConstView last_logits(std::span<const int32_t> ids, int64_t n_seq, int64_t seq_len);

  // Incremental decoding (inference; no backward). A fresh, empty cache for one sequence of up
  // to max_context positions (allocated here, never during decoding).
  SequenceCache new_cache(int64_t max_context) const;
  // Appends new tokens to B sequences of any lengths and returns the logits of each sequence's
  // last new token, [B, V], a view valid until the next call. ids holds n_new[b] tokens of
  // sequence b, sequences back to back; caches[b] grows by n_new[b]. B = 0 (no ids) on ranks
  // that only serve experts. Collective (MoE layers): every rank calls once per step.
  ConstView extend(std::span<const int32_t> ids, std::span<const int64_t> n_new,
                   std::span<SequenceCache* const> caches);
  // extend() with one sequence: the prompt into an empty (or partly filled) cache. Collective.
  ConstView prefill(std::span<const int32_t> prompt, SequenceCache& cache);
  // extend() with one new token per sequence: last[b] is sequence b's latest token. Collective.
  ConstView decode_step(std::span<const int32_t> last, std::span<SequenceCache* const> caches);
  // Packs every MoE layer's local expert weights and the attention projections for the
  // inference kernels that extend() then uses (MoeLayer / Attention::pack_for_inference);
  // serving and decoding benchmarks call it once after loading. Doubles those weights' memory
  // (kBf16: 1.5 times); call again after the weights change. Local.
  // kBf16 (weight-only bf16; activations and accumulation stay fp32): first
  // round_inference_weights(kBf16), then bf16 panels, so a decode step reads half the bytes
  // of those weights. Throws what round_inference_weights throws.
  void pack_for_inference(WeightType weights = WeightType::kFp32);
  // kBf16: rounds, in place and for good, the weights the inference GEMMs read to their
  // nearest bf16 values (runtime/gemm.hpp round_to_bf16): attention W_qkv and W_o, and W1, W2
  // of every expert bank (MoE layers and UMoE attention). Because the fp32 copies then hold
  // exactly the bf16 values, every path (last_logits / generate() on BLIS, extend() on packed
  // bf16 panels) computes on the same weights. Embedding, LM head, norms, routers, dense FFNs,
  // shared experts and UMoE projections stay fp32. A model with a PEER layer is refused (a
  // kConfig Error; nothing is changed). kFp32: nothing. Local; every rank rounds alike.
  void round_inference_weights(WeightType weights);
  // What pack_for_inference last packed (kFp32 before any call).
  WeightType inference_weights() const { return inference_weights_; }

  // Replicated parameters in the order backward finishes them; sharded expert parameters.
  const std::vector<ParamRef>& dense_params() const { return dense_; }
  const std::vector<ParamRef>& expert_params() const { return experts_; }
  // Collects the parameter lists again after MoE layers replaced their expert banks
  // (model/rebalance.hpp); dense_params() keeps its order and views. Local.
  void refresh_params() { collect_params(); }
  // Names of the dense parameters that take no weight decay (norm gains).
  bool no_decay(const std::string& name) const;
  void zero_grad();
  // Replicated state outside the optimiser that checkpoints carry (topk_bias router biases,
  // "blocks.3.moe.router.bias" [1, E]; PEER batch-norm running statistics).
  std::vector<std::pair<std::string, View>> buffers();
  // After each optimiser step (applied = false: skipped): the routers' bias updates. Local.
  void end_step(bool applied);

  ModelStats stats() const;
  ActivationBytes activation_bytes() const;
  const ModelConfig& config() const { return config_; }
  // The blocked placement of model.moe.num_experts experts (UMoE attention, and MoE blocks
  // unless model.moe.layer_experts gives each block its own count and blocked placement). It is
  // the initial map only: with comm.rebalance each MoE layer may move to its own
  // (MoeLayer::placement()).
  const comm::ExpertPlacement& placement() const { return placement_; }
  // The MoE layer of block l, or nullptr for a dense block.
  MoeLayer* moe_layer(int block);
  // Every MoE layer, in block order (for load statistics).
  std::vector<const MoeLayer*> moe_layers() const;
  // The PEER layer of block l, or nullptr.
  PeerLayer* peer_layer(int block);
  // The UMoE attention of block l, or nullptr (model.attention = mha).
  UmoeAttention* umoe_attention(int block);
  // Every expert bank once, with its checkpoint key: block l for the MoE FFN's bank (also when
  // the UMoE attention owns it and the FFN borrows it), n_layers + l for a UMoE attention bank
  // the FFN does not share. prefix names the owner, as in expert_params() ("blocks.3.attn.").
  struct ExpertBankRef {
    int layer;
    std::string prefix;
    ExpertBank* bank;
  };
  std::vector<ExpertBankRef> expert_banks();

 private:
  struct Block;
  // One block over this rank's n_tokens rows of x_[l] into x_[l + 1]; attend(block, h, out)
  // runs its attention (full sequences in training, KV caches in decoding). inference: the MoE
  // layer runs MoeLayer::infer (no backward follows).
  void run_block(int l, int64_t n_tokens,
                 const std::function<void(Block&, ConstView, View)>& attend, bool inference);
  void run_blocks(int64_t n_tokens, int64_t n_seq);
  // run_blocks() through the attention KV caches.
  void run_blocks_cached(int64_t n_tokens, std::span<const int64_t> n_new,
                         std::span<SequenceCache* const> caches);
  void collect_params();
  void set_peer_training(bool training);  // batch statistics (forward) or running (inference)

  ModelConfig config_;
  const comm::Communicator& comm_;
  comm::ExpertPlacement placement_;
  std::unique_ptr<Embedding> embed_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::unique_ptr<RmsNorm> final_norm_;
  std::unique_ptr<LmHead> head_;
  std::vector<ParamRef> dense_, experts_;
  // Ends in dense_ of the head's and the final norm's parameters (backward finishes them first).
  size_t head_params_end_ = 0, final_norm_params_end_ = 0;

  // Activations of the last forward: x_[l] is block l's input [N, d]; x_[L] the final stream.
  std::vector<Tensor> x_;
  Tensor h_final_;                      // [N, d] final norm output
  Tensor out_;                          // [N, d] a block's attention or FFN output (scratch)
  Tensor dx_, dtmp_;                    // [N, d] backward scratch
  std::vector<int32_t> ids_, targets_;  // [N]
  int64_t n_tokens_ = 0, n_seq_ = 0;
  // Incremental decoding scratch.
  std::vector<KvCache*> layer_caches_;                // [B] one block's caches
  std::vector<int64_t> ones_;                         // [B] n_new of a decode step
  WeightType inference_weights_ = WeightType::kFp32;  // pack_for_inference's last
};

}  // namespace moe::model
