#include "model/transformer.hpp"

#include <algorithm>
#include <sstream>

#include "runtime/data.hpp"
#include "runtime/error.hpp"

namespace moe::model {

namespace {

View rows(Tensor& t, int64_t n, int64_t d) {
  if (t.numel() < n * d) t.resize({std::max<int64_t>(n * d, 1)});
  return View(t.data(), n, d);
}

std::vector<int> parse_layer_experts(const Config& c, const ModelConfig& m);

}  // namespace

ModelConfig ModelConfig::from(const Config& c, int64_t data_vocab) {
  ModelConfig m;
  const int64_t vocab = c.get_int("model.vocab_size");
  if (vocab > 0 && vocab < data_vocab)
    throw Error(ErrorKind::kConfig,
                cat("model.vocab_size = ", vocab, " is smaller than the data's vocabulary of ",
                    data_vocab, " (", c.get_string("data.path"), "); use 0 to take the data's"));
  m.vocab_size = vocab > 0 ? vocab : data_vocab;
  m.d_model = c.get_int("model.d_model");
  m.n_layers = static_cast<int>(c.get_int("model.n_layers"));
  m.n_heads = static_cast<int>(c.get_int("model.n_heads"));
  m.d_ff = c.get_int("model.d_ff");
  m.activation =
      c.get_string("model.activation") == "swiglu" ? Activation::kSwiglu : Activation::kGelu;
  m.tie_embeddings = c.get_bool("model.tie_embeddings");
  m.norm_eps = static_cast<float>(c.get_float("model.norm_eps"));
  m.rope_base = c.get_float("model.rope_base");
  m.moe_every_n = static_cast<int>(c.get_int("model.moe.every_n_layers"));
  m.moe = MoeConfig::from(c);
  if (c.get_string("model.moe.kind") == "peer") {
    m.moe_every_n = 0;
    m.peer = PeerConfig::from(c);
    m.peer_layer = m.peer.layer < 0 ? m.n_layers / 2 : m.peer.layer;
    if (m.peer_layer >= m.n_layers)
      throw Error(ErrorKind::kConfig, cat("model.peer.layer = ", m.peer.layer,
                                          " is not a block of model.n_layers = ", m.n_layers));
  }
  m.umoe_attention = c.get_string("model.attention") == "umoe";
  m.share_attention_ffn = c.get_bool("model.moe.share_attention_ffn");
  if (m.umoe_attention) m.umoe = UmoeConfig::from(c);
  if (m.share_attention_ffn && !m.umoe_attention)
    throw Error(ErrorKind::kConfig,
                "model.moe.share_attention_ffn = true needs model.attention = umoe (the FFN "
                "shares the UMoE attention's experts)");
  if (m.umoe_attention && m.umoe.top_k > m.moe.n_experts)
    throw Error(ErrorKind::kConfig, cat("model.umoe.top_k = ", m.umoe.top_k, " exceeds ",
                                        "model.moe.num_experts = ", m.moe.n_experts));
  if (m.d_model % m.n_heads != 0 || (m.d_model / m.n_heads) % 2 != 0)
    throw Error(ErrorKind::kConfig,
                cat("model.n_heads = ", m.n_heads, " must divide model.d_model = ", m.d_model,
                    " into heads of even width (RoPE rotates pairs)"));
  if (m.n_moe_layers() > 0 && m.moe.top_k > m.moe.n_experts)
    throw Error(ErrorKind::kConfig, cat("model.moe.top_k = ", m.moe.top_k, " exceeds ",
                                        "model.moe.num_experts = ", m.moe.n_experts));
  m.layer_experts = parse_layer_experts(c, m);
  return m;
}

namespace {

// model.moe.layer_experts as [n_layers] counts (0 for blocks without MoE), or empty.
std::vector<int> parse_layer_experts(const Config& c, const ModelConfig& m) {
  const std::string text = c.get_string("model.moe.layer_experts");
  if (text.find_first_not_of(" \t") == std::string::npos) return {};
  auto bad = [&](const std::string& why) {
    return Error(ErrorKind::kConfig, cat("model.moe.layer_experts = '", text, "': ", why));
  };
  std::vector<int> counts;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    size_t used = 0;
    int n = 0;
    try {
      n = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || item.find_first_not_of(" \t", used) != std::string::npos)
      throw bad(cat("'", item, "' is not an integer (expected comma-separated expert counts)"));
    if (n < std::max(1, m.moe.top_k) || n > (1 << 20))
      throw bad(cat(n, " experts is outside [model.moe.top_k = ", m.moe.top_k, ", ", 1 << 20, "]"));
    counts.push_back(n);
  }
  if (static_cast<int>(counts.size()) != m.n_moe_layers())
    throw bad(cat(counts.size(), " count(s) for the model's ", m.n_moe_layers(),
                  " MoE block(s) (one per MoE block, in block order)"));
  if (m.umoe_attention || m.moe.router == RouterKind::kSingleGate)
    throw bad(cat("per-layer expert counts need model.attention = mha and a router other than ",
                  "single_gate (those share one expert count)"));
  std::vector<int> out(static_cast<size_t>(m.n_layers), 0);
  size_t i = 0;
  for (int l = 0; l < m.n_layers; ++l)
    if (m.is_moe(l)) out[static_cast<size_t>(l)] = counts[i++];
  return out;
}

}  // namespace

int ModelConfig::min_experts() const {
  int e = moe.n_experts;
  bool any = false;
  for (int l = 0; l < n_layers; ++l)
    if (is_moe(l)) {
      e = any ? std::min(e, experts(l)) : experts(l);
      any = true;
    }
  return e;
}

MoeConfig ModelConfig::moe_for(int layer) const {
  MoeConfig c = moe;
  c.n_experts = experts(layer);
  return c;
}

int ModelConfig::n_moe_layers() const {
  int n = 0;
  for (int l = 0; l < n_layers; ++l) n += is_moe(l);
  return n;
}

double ModelConfig::active_params() const {
  const double d = static_cast<double>(d_model);
  const double ffn_mats = activation == Activation::kSwiglu ? 3.0 : 2.0;
  const double moe_mats = moe.activation == Activation::kSwiglu ? 3.0 : 2.0;
  double n = 0;
  for (int l = 0; l < n_layers; ++l) {
    n += 2 * d;  // the two norm gains
    if (umoe_attention) {
      // router, W_q, W_k, every query correction; k routed and n_s shared experts per token
      const double nq = moe.n_experts + umoe.shared_experts, r = double(umoe.query_rank);
      n += d * moe.n_experts + 2 * d * double(umoe.d_qk) + nq * r * (d + double(umoe.d_qk)) +
           (umoe.top_k + umoe.shared_experts) * moe_mats * d * double(moe.d_ff);
    } else {
      n += 4 * d * d;  // attention (fused QKV + output)
    }
    // Expert choice: C experts per token on average (C = capacity_factor, or top_k when 0).
    const double k = moe.router == RouterKind::kExpertChoice && moe.capacity_factor > 0
                         ? moe.capacity_factor
                         : moe.top_k;
    if (is_moe(l))
      n += d * experts(l) + (k + moe.shared_experts) * moe_mats * d * double(moe.d_ff);
    else if (is_peer(l))  // query networks, then one u and one v row per retrieved expert
      n += d * static_cast<double>(peer.heads * peer.d_key) +
           2.0 * d * static_cast<double>(peer.heads * peer.top_k);
    else
      n += ffn_mats * d * static_cast<double>(d_ff);
  }
  return n + d + static_cast<double>(vocab_size) * d;  // final norm, LM head
}

double ModelConfig::flops_per_token(int64_t seq_len) const {
  return 6.0 * active_params() + 12.0 * n_layers * static_cast<double>(seq_len) * d_model;
}

struct Transformer::Block {
  std::unique_ptr<RmsNorm> norm1, norm2;
  std::unique_ptr<Attention> attn;      // model.attention = mha
  std::unique_ptr<UmoeAttention> umoe;  // model.attention = umoe
  std::unique_ptr<Ffn> ffn;             // dense blocks
  std::unique_ptr<MoeLayer> moe;        // MoE blocks
  std::unique_ptr<PeerLayer> peer;      // the PEER block
  Tensor h1, x1, h2;                    // [N, d]: norm1 output, mid residual, norm2 output
  // Ranges of dense_params() finished by each backward stage.
  size_t ffn_params_end = 0, norm2_end = 0, attn_end = 0, norm1_end = 0;
};

Transformer::Transformer(const ModelConfig& config, const comm::Communicator& comm, uint64_t seed)
    : config_(config), comm_(comm) {
  const int64_t d = config.d_model;
  if (config.umoe_attention || (config.n_moe_layers() > 0 && config.layer_experts.empty()))
    placement_ = comm::ExpertPlacement::blocked(config.moe.n_experts, comm.size());
  embed_ = std::make_unique<Embedding>("embed", config.vocab_size, d, seed);
  AttentionConfig ac;
  ac.n_heads = config.n_heads;
  ac.rope_base = config.rope_base;
  for (int l = 0; l < config.n_layers; ++l) {
    auto b = std::make_unique<Block>();
    const std::string p = cat("blocks.", l, ".");
    b->norm1 = std::make_unique<RmsNorm>(p + "norm1", d, config.norm_eps);
    if (config.umoe_attention)
      b->umoe = std::make_unique<UmoeAttention>(p + "attn", d, config.umoe, config.moe, placement_,
                                                comm, seed);
    else
      b->attn = std::make_unique<Attention>(p + "attn", d, ac, seed);
    b->norm2 = std::make_unique<RmsNorm>(p + "norm2", d, config.norm_eps);
    if (config.is_moe(l) && config.share_attention_ffn)
      b->moe = std::make_unique<MoeLayer>(p + "moe", d, config.moe, placement_, comm, seed,
                                          b->umoe->experts());
    else if (config.is_moe(l) && config.layer_experts.empty())
      b->moe = std::make_unique<MoeLayer>(p + "moe", d, config.moe, placement_, comm, seed);
    else if (config.is_moe(l))  // model.moe.layer_experts: this block's own count and placement
      b->moe = std::make_unique<MoeLayer>(
          p + "moe", d, config.moe_for(l),
          comm::ExpertPlacement::blocked(config.experts(l), comm.size()), comm, seed);
    else if (config.is_peer(l))
      b->peer = std::make_unique<PeerLayer>(p + "peer", d, config.peer, comm, seed);
    else
      b->ffn = std::make_unique<Ffn>(p + "ffn", d, config.d_ff, config.activation, seed);
    blocks_.push_back(std::move(b));
  }
  final_norm_ = std::make_unique<RmsNorm>("final_norm", d, config.norm_eps);
  head_ = config.tie_embeddings ? std::make_unique<LmHead>("head", *embed_)
                                : std::make_unique<LmHead>("head", config.vocab_size, d, seed);
  x_.resize(static_cast<size_t>(config.n_layers + 1));
  collect_params();
}

Transformer::~Transformer() = default;

void Transformer::collect_params() {
  dense_.clear();
  experts_.clear();
  auto take = [&](std::vector<ParamRef> ps) {
    for (auto& p : ps) dense_.push_back(std::move(p));
  };
  take(head_->params());  // empty when tied
  head_params_end_ = dense_.size();
  take(final_norm_->params());
  final_norm_params_end_ = dense_.size();
  for (int l = config_.n_layers - 1; l >= 0; --l) {
    Block& b = *blocks_[static_cast<size_t>(l)];
    if (b.moe) {
      for (ParamRef p : b.moe->replicated_params()) {
        p.name = cat("blocks.", l, ".moe.", p.name);
        dense_.push_back(p);
      }
      if (b.moe->owns_experts())
        for (ParamRef p : b.moe->experts().params()) {
          p.name = cat("blocks.", l, ".moe.", p.name);
          experts_.push_back(p);
        }
    } else if (b.peer) {
      take(b.peer->dense_params());
      for (ParamRef& p : b.peer->table_params()) experts_.push_back(p);
    } else {
      take(b.ffn->params());
    }
    b.ffn_params_end = dense_.size();
    take(b.norm2->params());
    b.norm2_end = dense_.size();
    if (b.umoe) {
      for (ParamRef p : b.umoe->replicated_params()) {
        p.name = cat("blocks.", l, ".attn.", p.name);
        dense_.push_back(p);
      }
      for (ParamRef p : b.umoe->experts().params()) {
        p.name = cat("blocks.", l, ".attn.", p.name);
        experts_.push_back(p);
      }
    } else {
      take(b.attn->params());
    }
    b.attn_end = dense_.size();
    take(b.norm1->params());
    b.norm1_end = dense_.size();
  }
  take(embed_->params());
}

bool Transformer::no_decay(const std::string& name) const {
  auto ends_with = [&](const char* s) {
    std::string t(s);
    return name.size() >= t.size() && name.compare(name.size() - t.size(), t.size(), t) == 0;
  };
  return ends_with(".gain") || ends_with(".b_qkv") || ends_with(".b_o") || ends_with(".bias");
}

void Transformer::zero_grad() {
  for (auto& p : dense_) p.grad.fill(0.0f);
  for (auto& p : experts_)
    if (!p.sparse_rows) p.grad.fill(0.0f);
  for (auto& b : blocks_)
    if (b->peer) b->peer->zero_grad();  // only the rows it touched
}

void Transformer::set_peer_training(bool training) {
  for (auto& b : blocks_)
    if (b->peer) b->peer->set_training(training);
}

PeerLayer* Transformer::peer_layer(int block) {
  return blocks_[static_cast<size_t>(block)]->peer.get();
}

void Transformer::run_block(int l, int64_t n,
                            const std::function<void(Block&, ConstView, View)>& attend,
                            bool inference) {
  const int64_t d = config_.d_model;
  Block& b = *blocks_[static_cast<size_t>(l)];
  ConstView x(x_[static_cast<size_t>(l)].data(), n, d);
  View h1 = rows(b.h1, n, d), x1 = rows(b.x1, n, d), h2 = rows(b.h2, n, d);
  View out = rows(out_, n, d);  // one scratch for every block's two sublayer outputs
  b.norm1->forward(x, h1);
  attend(b, h1, out);
  add(x, out, x1);
  b.norm2->forward(x1, h2);
  if (b.moe && inference)
    b.moe->infer(h2, out);
  else if (b.moe)
    b.moe->forward(h2, out);
  else if (b.peer)
    b.peer->forward(h2, out);
  else
    b.ffn->forward(h2, out);
  add(x1, out, rows(x_[static_cast<size_t>(l) + 1], n, d));
}

void Transformer::run_blocks(int64_t n, int64_t n_seq) {
  for (int l = 0; l < config_.n_layers; ++l)
    run_block(
        l, n,
        [&](Block& b, ConstView h, View out) {
          if (b.umoe)
            b.umoe->forward(h, n_seq, out);
          else
            b.attn->forward(h, n_seq, out);
        },
        /*inference=*/false);
}

double Transformer::forward(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len,
                            double normaliser) {
  const int64_t n = n_seq * seq_len, d = config_.d_model;
  split_windows(windows, n_seq, seq_len, ids_, targets_);
  n_tokens_ = n;
  n_seq_ = n_seq;
  set_peer_training(true);
  embed_->forward(ids_, rows(x_[0], n, d));
  run_blocks(n, n_seq);
  View h = rows(h_final_, n, d);
  final_norm_->forward(ConstView(x_.back().data(), n, d), h);
  return head_->forward(h, targets_, normaliser);
}

void Transformer::backward(float aux_scale, const std::function<void(size_t)>& on_dense_ready) {
  const int64_t n = n_tokens_, d = config_.d_model;
  size_t done = 0;
  auto ready_until = [&](size_t end) {
    for (; done < end; ++done)
      if (on_dense_ready) on_dense_ready(done);
  };
  View g = rows(dx_, n, d), tmp = rows(dtmp_, n, d);
  head_->backward(tmp);  // dL/dh_final
  ready_until(head_params_end_);
  final_norm_->backward(tmp, g);  // g = dL/dx_L
  ready_until(final_norm_params_end_);
  for (int l = config_.n_layers - 1; l >= 0; --l) {
    Block& b = *blocks_[static_cast<size_t>(l)];
    if (b.moe)
      b.moe->backward(g, tmp, aux_scale);
    else if (b.peer)
      b.peer->backward(g, tmp);
    else
      b.ffn->backward(g, tmp);
    ready_until(b.ffn_params_end);
    b.norm2->backward(tmp, tmp);
    ready_until(b.norm2_end);
    add_into(g, tmp);  // g = dL/dx1
    if (b.umoe)
      b.umoe->backward(g, tmp, aux_scale);
    else
      b.attn->backward(g, tmp);
    ready_until(b.attn_end);
    b.norm1->backward(tmp, tmp);
    ready_until(b.norm1_end);
    add_into(g, tmp);  // g = dL/dx_l
  }
  embed_->backward(g);
  ready_until(dense_.size());
}

ConstView Transformer::last_logits(std::span<const int32_t> ids, int64_t n_seq, int64_t seq_len) {
  const int64_t n = n_seq * seq_len, d = config_.d_model;
  MOE_CHECK_EQ(static_cast<int64_t>(ids.size()), n, "ids");
  n_tokens_ = n;
  n_seq_ = n_seq;
  set_peer_training(false);
  embed_->forward(ids, rows(x_[0], n, d));
  run_blocks(n, n_seq);
  // Only the last position of each sequence goes through the final norm and the head.
  View last = rows(dtmp_, n_seq, d);
  for (int64_t s = 0; s < n_seq; ++s)
    std::copy_n(x_.back().data() + ((s + 1) * seq_len - 1) * d, d, last.row(s));
  View h = rows(h_final_, n_seq, d);
  final_norm_->forward(last, h);
  return head_->logits(h);
}

SequenceCache Transformer::new_cache(int64_t max_context) const {
  SequenceCache c;
  for (int l = 0; l < config_.n_layers; ++l) c.layers.emplace_back(max_context, config_.d_model);
  return c;
}

void Transformer::run_blocks_cached(int64_t n, std::span<const int64_t> n_new,
                                    std::span<SequenceCache* const> caches) {
  layer_caches_.resize(caches.size());
  for (int l = 0; l < config_.n_layers; ++l) {
    for (size_t s = 0; s < caches.size(); ++s)
      layer_caches_[s] = &caches[s]->layers[static_cast<size_t>(l)];
    run_block(
        l, n,
        [&](Block& b, ConstView h, View out) {
          if (b.umoe)
            b.umoe->forward_cached(h, n_new, layer_caches_, out);
          else
            b.attn->forward_cached(h, n_new, layer_caches_, out);
        },
        /*inference=*/true);
  }
}

ConstView Transformer::extend(std::span<const int32_t> ids, std::span<const int64_t> n_new,
                              std::span<SequenceCache* const> caches) {
  const int64_t d = config_.d_model, B = static_cast<int64_t>(n_new.size());
  MOE_CHECK_EQ(n_new.size(), caches.size(), "extend: sequences");
  int64_t n = 0;
  for (int64_t k : n_new) n += k;
  MOE_CHECK_EQ(static_cast<int64_t>(ids.size()), n, "extend: ids");
  for (SequenceCache* c : caches)
    MOE_CHECK_EQ(static_cast<int>(c->layers.size()), config_.n_layers, "extend: cache blocks");
  n_tokens_ = n;
  n_seq_ = B;
  set_peer_training(false);
  embed_->forward(ids, rows(x_[0], n, d));
  run_blocks_cached(n, n_new, caches);
  // Only each sequence's last new position goes through the final norm and the head.
  View last = rows(dtmp_, B, d);
  int64_t end = 0;
  for (int64_t s = 0; s < B; ++s) {
    end += n_new[static_cast<size_t>(s)];
    std::copy_n(x_.back().data() + (end - 1) * d, d, last.row(s));
  }
  View h = rows(h_final_, B, d);
  final_norm_->forward(last, h);
  return head_->logits(h);
}

ConstView Transformer::prefill(std::span<const int32_t> prompt, SequenceCache& cache) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  SequenceCache* c = &cache;
  return extend(prompt, std::span<const int64_t>(&n, 1), std::span<SequenceCache* const>(&c, 1));
}

ConstView Transformer::decode_step(std::span<const int32_t> last,
                                   std::span<SequenceCache* const> caches) {
  ones_.assign(caches.size(), 1);
  return extend(last, ones_, caches);
}

void Transformer::pack_for_inference(WeightType weights) {
  round_inference_weights(weights);
  for (int l = 0; l < config_.n_layers; ++l) {
    if (MoeLayer* m = moe_layer(l)) m->pack_for_inference(weights);
    if (Attention* a = blocks_[static_cast<size_t>(l)]->attn.get()) a->pack_for_inference(weights);
  }
  inference_weights_ = weights;
}

void Transformer::round_inference_weights(WeightType weights) {
  if (weights != WeightType::kBf16) return;
  if (config_.peer_layer >= 0)
    throw Error(ErrorKind::kConfig,
                cat("weights bf16: not supported for a model with a PEER layer (block ",
                    config_.peer_layer, ", model.moe.kind peer); use fp32"));
  for (const ExpertBankRef& b : expert_banks()) b.bank->round_to_bf16();
  for (auto& b : blocks_)
    if (b->attn) b->attn->round_to_bf16();
}

std::vector<std::pair<std::string, View>> Transformer::buffers() {
  std::vector<std::pair<std::string, View>> out;
  for (int l = 0; l < config_.n_layers; ++l)
    if (MoeLayer* m = moe_layer(l))
      for (auto& [name, v] : m->buffers()) out.emplace_back(cat("blocks.", l, ".moe.", name), v);
  for (auto& b : blocks_)
    if (b->peer)
      for (ParamRef& p : b->peer->buffers()) out.emplace_back(p.name, p.value);
  return out;
}

void Transformer::end_step(bool applied) {
  for (auto& b : blocks_)
    if (b->moe) b->moe->end_step(applied);
}

MoeLayer* Transformer::moe_layer(int block) {
  return blocks_[static_cast<size_t>(block)]->moe.get();
}

std::vector<const MoeLayer*> Transformer::moe_layers() const {
  std::vector<const MoeLayer*> out;
  for (const auto& b : blocks_)
    if (b->moe) out.push_back(b->moe.get());
  return out;
}

UmoeAttention* Transformer::umoe_attention(int block) {
  return blocks_[static_cast<size_t>(block)]->umoe.get();
}

std::vector<Transformer::ExpertBankRef> Transformer::expert_banks() {
  std::vector<ExpertBankRef> out;
  for (int l = 0; l < config_.n_layers; ++l) {
    Block& b = *blocks_[static_cast<size_t>(l)];
    if (b.moe && b.moe->owns_experts())
      out.push_back({l, cat("blocks.", l, ".moe."), &b.moe->experts()});
    if (b.umoe)  // key l when the FFN borrows this bank, else one past the blocks
      out.push_back({b.moe && !b.moe->owns_experts() ? l : config_.n_layers + l,
                     cat("blocks.", l, ".attn."), &b.umoe->experts()});
  }
  return out;
}

ActivationBytes Transformer::activation_bytes() const {
  ActivationBytes a;
  for (const Tensor& t : x_) a.streams += t.numel() * 4;
  a.streams += (h_final_.numel() + out_.numel()) * 4;
  for (const auto& b : blocks_) {
    a.streams += (b->h1.numel() + b->x1.numel() + b->h2.numel()) * 4;
    if (b->attn) {  // UMoE attention keeps its own caches (not counted here)
      a.attention_probs += b->attn->probs_bytes();
      a.attention_qkv += b->attn->cache_bytes();
    }
  }
  a.head = head_->cache_bytes();
  return a;
}

ModelStats Transformer::stats() const {
  ModelStats s;
  int64_t routed = 0, dropped = 0;
  for (const auto& b : blocks_)
    if (b->umoe) {
      const UmoeStats& st = b->umoe->stats();
      s.aux_loss += st.aux_loss;
      s.load_balance_loss += st.load_balance_loss;
      s.z_loss += st.z_loss;
      s.expert_imbalance = std::max(s.expert_imbalance, st.load.expert_imbalance);
      routed += st.load.slots_total;
      s.exchange_seconds += st.exchange_seconds;
      s.bytes_sent += st.bytes_sent;
    }
  for (const MoeLayer* m : moe_layers()) {
    const MoeLoadStats& st = m->stats();
    s.aux_loss += st.aux_loss;
    s.load_balance_loss += st.load_balance_loss;
    s.z_loss += st.z_loss;
    s.expert_imbalance = std::max(s.expert_imbalance, st.load.expert_imbalance);
    routed += st.load.slots_total;
    dropped += st.load.slots_dropped;
    s.exchange_seconds += st.exchange_seconds;
    s.bytes_sent += st.bytes_sent;
  }
  s.drop_rate = routed ? static_cast<double>(dropped) / static_cast<double>(routed) : 0.0;
  return s;
}

}  // namespace moe::model
