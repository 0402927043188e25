#include "model/single_gate.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/buffers.hpp"
#include "runtime/data.hpp"
#include "runtime/error.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

namespace {

// log sum_v exp(z_v), max subtracted first.
double log_sum_exp(const float* z, int64_t V) {
  float m = z[0];
  for (int64_t v = 1; v < V; ++v) m = std::max(m, z[v]);
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(double(z[v]) - m);
  return m + std::log(s);
}

// One row of the ensemble cross-entropy -log(a softmax(zb)[t] + (1 - a) softmax(ze)[t]).
// With dzb/dze, writes scale * r (softmax(zb) - onehot) and scale * (1 - r)(softmax(ze) -
// onehot) (they may be zb/ze themselves). a = 1 never reads ze.
double ensemble_row(const float* zb, const float* ze, int64_t V, int32_t t, double a, float* dzb,
                    float* dze, double scale) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const double lse_b = log_sum_exp(zb, V);
  const double lse_e = a < 1 ? log_sum_exp(ze, V) : 0.0;
  const double la = a > 0 ? std::log(a) + double(zb[t]) - lse_b : kNegInf;
  const double le = a < 1 ? std::log1p(-a) + double(ze[t]) - lse_e : kNegInf;
  const double hi = std::max(la, le);
  const double lq = hi + std::log(std::exp(la - hi) + std::exp(le - hi));
  if (dzb) {
    const double r = a > 0 ? std::exp(la - lq) : 0.0;  // the base branch's share of p[t]
    for (int64_t v = 0; v < V; ++v)
      dzb[v] = static_cast<float>(scale * r * (std::exp(double(zb[v]) - lse_b) - (v == t)));
    if (a < 1)
      for (int64_t v = 0; v < V; ++v)
        dze[v] = static_cast<float>(scale * (1 - r) * (std::exp(double(ze[v]) - lse_e) - (v == t)));
  }
  return -lq;
}

}  // namespace

SingleGateConfig SingleGateConfig::from(const Config& c, const ModelConfig& m) {
  SingleGateConfig s;
  s.shared_layers = static_cast<int>(c.get_int("model.single_gate.shared_layers"));
  s.ensemble = c.get_float("model.single_gate.ensemble");
  s.exit_threshold = c.get_float("model.single_gate.exit_threshold");
  s.base_fraction = c.get_float("model.single_gate.base_fraction");
  s.gate_fraction = c.get_float("model.single_gate.gate_fraction");
  s.kmeans_sequences = c.get_int("model.single_gate.kmeans_sequences");
  s.kmeans_iters = static_cast<int>(c.get_int("model.single_gate.kmeans_iters"));
  s.base_checkpoint = c.get_string("model.single_gate.base_checkpoint");
  s.freeze_base = c.get_bool("model.single_gate.freeze_base");
  if (s.shared_layers >= m.n_layers)
    throw Error(ErrorKind::kConfig,
                cat("model.single_gate.shared_layers = ", s.shared_layers, " leaves no later ",
                    "block for the experts: it must be below model.n_layers = ", m.n_layers));
  if (s.base_fraction + s.gate_fraction >= 1.0)
    throw Error(ErrorKind::kConfig,
                cat("model.single_gate.base_fraction + gate_fraction = ",
                    s.base_fraction + s.gate_fraction, " leaves no steps for the experts (< 1)"));
  return s;
}

const char* phase_name(SingleGatePhase p) {
  switch (p) {
    case SingleGatePhase::kBase:
      return "base";
    case SingleGatePhase::kExperts:
      return "experts";
    case SingleGatePhase::kGate:
      return "gate";
  }
  return "?";
}

// Dense blocks [first, last): x += attention(norm1(x)); x += ffn(norm2(x)).
class SingleGateModel::Stack {
 public:
  Stack(const std::string& prefix, int first, int last, const ModelConfig& mc, uint64_t seed)
      : d_(mc.d_model) {
    AttentionConfig ac;
    ac.n_heads = mc.n_heads;
    ac.rope_base = mc.rope_base;
    for (int l = first; l < last; ++l) {
      auto b = std::make_unique<Block>();
      const std::string p = cat(prefix, "blocks.", l, ".");
      b->norm1 = std::make_unique<RmsNorm>(p + "norm1", d_, mc.norm_eps);
      b->attn = std::make_unique<Attention>(p + "attn", d_, ac, seed);
      b->norm2 = std::make_unique<RmsNorm>(p + "norm2", d_, mc.norm_eps);
      b->ffn = std::make_unique<Ffn>(p + "ffn", d_, mc.d_ff, mc.activation, seed);
      blocks_.push_back(std::move(b));
    }
  }

  // x [n, d] (borrowed until backward) -> the last block's output [n, d] (this stack's buffer).
  ConstView forward(ConstView x, int64_t n_seq) {
    const int64_t n = x.rows;
    ConstView in = x;
    for (auto& b : blocks_) {
      View h1 = scratch(b->h1, n, d_), x1 = scratch(b->x1, n, d_), h2 = scratch(b->h2, n, d_);
      View out = scratch(b->out, n, d_), y = scratch(b->y, n, d_);
      b->norm1->forward(in, h1);
      b->attn->forward(h1, n_seq, out);
      copy(in, x1);
      add_into(x1, out);
      b->norm2->forward(x1, h2);
      b->ffn->forward(h2, out);
      copy(x1, y);
      add_into(y, out);
      in = y;
    }
    return in;
  }

  // g [n, d]: dL/d(output) in, dL/dx out. ACCUMULATES the parameter gradients.
  void backward(View g) {
    View tmp = scratch(tmp_, g.rows, d_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      Block& b = **it;
      b.ffn->backward(g, tmp);
      b.norm2->backward(tmp, tmp);
      add_into(g, tmp);
      b.attn->backward(g, tmp);
      b.norm1->backward(tmp, tmp);
      add_into(g, tmp);
    }
  }

  std::vector<ParamRef> params() {
    std::vector<ParamRef> out;
    for (auto& b : blocks_)
      for (auto ps : {b->norm1->params(), b->attn->params(), b->norm2->params(), b->ffn->params()})
        out.insert(out.end(), ps.begin(), ps.end());
    return out;
  }

 private:
  struct Block {
    std::unique_ptr<RmsNorm> norm1, norm2;
    std::unique_ptr<Attention> attn;
    std::unique_ptr<Ffn> ffn;
    Tensor h1, x1, h2, out, y;  // [n, d]
  };
  int64_t d_;
  std::vector<std::unique_ptr<Block>> blocks_;
  Tensor tmp_;
};

struct SingleGateModel::Expert {
  int gid = 0;
  std::unique_ptr<Stack> blocks;
  std::unique_ptr<RmsNorm> final_norm;
  int64_t row0 = 0, n_seq = 0;  // received sequences of the last forward
};

SingleGateModel::SingleGateModel(const ModelConfig& mc, const SingleGateConfig& sg,
                                 const comm::Communicator& comm, uint64_t seed)
    : config_(mc), sg_(sg), comm_(comm), exchange_(comm, "single_gate") {
  const int64_t d = mc.d_model, E = mc.moe.n_experts;
  const int L = mc.n_layers, Ls = sg.shared_layers;
  MOE_CHECK(Ls >= 1 && Ls < L, "single_gate: shared_layers ", Ls, " of ", L);
  placement_ = comm::ExpertPlacement::blocked(static_cast<int>(E), comm.size());
  embed_ = std::make_unique<Embedding>("embed", mc.vocab_size, d, seed);
  shared_ = std::make_unique<Stack>("", 0, Ls, mc, seed);
  base_later_ = std::make_unique<Stack>("", Ls, L, mc, seed);
  base_norm_ = std::make_unique<RmsNorm>("base_norm", d, mc.norm_eps);
  final_norm_ = std::make_unique<RmsNorm>("final_norm", d, mc.norm_eps);
  auto head = [&](const char* name) {
    return mc.tie_embeddings ? std::make_unique<LmHead>(name, *embed_)
                             : std::make_unique<LmHead>(name, mc.vocab_size, d, seed);
  };
  base_head_ = head("base_head");
  head_ = head("head");
  w_gate_ = Tensor({d, E});
  dw_gate_ = Tensor({d, E});
  b_gate_ = Tensor({1, E});
  db_gate_ = Tensor({1, E});
  init_uniform(w_gate_.view(), 1.0f / std::sqrt(static_cast<float>(d)), seed,
               init_stream("gate.weight", 0));
  for (int gid : placement_.local_experts(comm.rank())) {
    auto e = std::make_unique<Expert>();
    e->gid = gid;
    const std::string p = cat("experts.", gid, ".");
    e->blocks = std::make_unique<Stack>(p, Ls, L, mc, seed);
    e->final_norm = std::make_unique<RmsNorm>(p + "final_norm", d, mc.norm_eps);
    experts_.push_back(std::move(e));
  }
  stats_.expert_sequences.assign(static_cast<size_t>(E), 0);
}

SingleGateModel::~SingleGateModel() = default;

std::vector<ParamRef> SingleGateModel::base_model_params() {
  std::vector<ParamRef> out = embed_->params();
  for (Stack* s : {shared_.get(), base_later_.get()})
    for (auto& p : s->params()) out.push_back(p);
  for (auto& p : final_norm_->params()) out.push_back(p);
  for (auto& p : head_->params()) out.push_back(p);
  return out;
}

std::vector<ParamRef> SingleGateModel::base_branch_params() {
  std::vector<ParamRef> out = base_norm_->params();
  for (auto& p : base_head_->params()) out.push_back(p);
  return out;
}

std::vector<ParamRef> SingleGateModel::dense_params(SingleGatePhase phase) {
  std::vector<ParamRef> out;
  auto take = [&](std::vector<ParamRef> ps) { out.insert(out.end(), ps.begin(), ps.end()); };
  switch (phase) {
    case SingleGatePhase::kBase:
      take(base_model_params());
      take(base_branch_params());
      break;
    case SingleGatePhase::kExperts:
      if (!sg_.freeze_base) {
        take(embed_->params());
        take(shared_->params());
        take(base_branch_params());
      }
      take(head_->params());  // the experts' head (tied: nothing, the embedding is above)
      break;
    case SingleGatePhase::kGate:
      out.push_back({"gate.weight", w_gate_.view(), dw_gate_.view()});
      out.push_back({"gate.bias", b_gate_.view(), db_gate_.view()});
      break;
  }
  return out;
}

std::vector<ParamRef> SingleGateModel::all_dense_params() {
  std::vector<ParamRef> out = dense_params(SingleGatePhase::kBase);
  for (auto& p : dense_params(SingleGatePhase::kGate)) out.push_back(p);
  return out;
}

std::vector<std::pair<int, std::vector<ParamRef>>> SingleGateModel::expert_groups() {
  std::vector<std::pair<int, std::vector<ParamRef>>> out;
  for (auto& e : experts_) {
    std::vector<ParamRef> ps = e->blocks->params();
    for (auto& p : e->final_norm->params()) ps.push_back(p);
    out.emplace_back(e->gid, std::move(ps));
  }
  return out;
}

std::vector<ParamRef> SingleGateModel::expert_params() {
  std::vector<ParamRef> out;
  for (auto& [gid, ps] : expert_groups()) out.insert(out.end(), ps.begin(), ps.end());
  return out;
}

void SingleGateModel::zero_grad() {
  for (auto& p : all_dense_params()) p.grad.fill(0.0f);
  for (auto& p : expert_params()) p.grad.fill(0.0f);
}

void SingleGateModel::copy_base_into_experts() {
  std::vector<ParamRef> base = base_later_->params();
  for (auto& p : final_norm_->params()) base.push_back(p);
  for (auto& [gid, ps] : expert_groups()) {
    MOE_CHECK_EQ(ps.size(), base.size(), "single_gate: expert ", gid, " parameters");
    for (size_t i = 0; i < ps.size(); ++i) copy(base[i].value, ps[i].value);
  }
}

void SingleGateModel::set_gate_from_centroids(ConstView c) {
  const int64_t E = config_.moe.n_experts, d = config_.d_model;
  MOE_CHECK_SHAPE(c, E, d, "single_gate centroids");
  for (int64_t e = 0; e < E; ++e) {
    double sq = 0;
    for (int64_t j = 0; j < d; ++j) {
      w_gate_.view()(j, e) = 2.0f * c(e, j);
      sq += double(c(e, j)) * c(e, j);
    }
    b_gate_[e] = static_cast<float>(-sq);
  }
}

ConstView SingleGateModel::pooled() const {
  return ConstView(pooled_.data(), n_seq_, config_.d_model);
}

ConstView SingleGateModel::pool(std::span<const int32_t> windows, int64_t n_seq, int64_t seq_len) {
  read_windows(windows, n_seq, seq_len);
  run_base(n_seq, seq_len);
  return pooled();
}

ConstView SingleGateModel::received(int local) const {
  const Expert& e = *experts_[static_cast<size_t>(local)];
  const int64_t W = seq_len_ * config_.d_model;
  return ConstView(recv_.data() + e.row0 * W, e.n_seq * seq_len_, config_.d_model);
}

void SingleGateModel::read_windows(std::span<const int32_t> windows, int64_t n_seq,
                                   int64_t seq_len) {
  split_windows(windows, n_seq, seq_len, ids_, targets_);
  n_seq_ = n_seq;
  seq_len_ = seq_len;
}

void SingleGateModel::run_base(int64_t B, int64_t S) {
  const int64_t n = B * S, d = config_.d_model, E = config_.moe.n_experts;
  View x0 = scratch(x0_, n, d);
  embed_->forward(ids_, x0);
  xs_ = shared_->forward(x0, B);
  View hb = scratch(h_base_, n, d);
  base_norm_->forward(xs_, hb);
  zb_ = base_head_->logits_for_backward(hb);
  // u_b = mean over the sequence's positions; gate logits u W_g + c_g.
  View u = scratch(pooled_, B, d);
  for (int64_t b = 0; b < B; ++b) {
    float* ub = u.row(b);
    std::fill(ub, ub + d, 0.0f);
    for (int64_t t = 0; t < S; ++t) {
      const float* h = hb.row(b * S + t);
      for (int64_t j = 0; j < d; ++j) ub[j] += h[j];
    }
    for (int64_t j = 0; j < d; ++j) ub[j] /= static_cast<float>(S);
  }
  View gl = scratch(gate_logits_, B, E);
  if (B > 0) gemm(Trans::kNo, Trans::kNo, 1.0f, u, w_gate_.view(), 0.0f, gl);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t e = 0; e < E; ++e) gl(b, e) += b_gate_[e];
}

void SingleGateModel::choose_experts(int64_t B) {
  const int64_t E = config_.moe.n_experts;
  routed_.assign(static_cast<size_t>(B), 0);
  if (!forced_.empty()) {
    MOE_CHECK_EQ(static_cast<int64_t>(forced_.size()), B, "single_gate forced experts");
    routed_ = forced_;
    return;
  }
  ConstView gl(gate_logits_.data(), B, E);
  for (int64_t b = 0; b < B; ++b)
    routed_[static_cast<size_t>(b)] =
        static_cast<int32_t>(std::max_element(gl.row(b), gl.row(b) + E) - gl.row(b));
}

void SingleGateModel::run_experts(int64_t B, int64_t S, bool all) {
  const int64_t d = config_.d_model, W = S * d;
  const int k = all ? static_cast<int>(config_.moe.n_experts) : 1;
  slot_expert_.resize(static_cast<size_t>(B * k));
  slot_weight_.assign(static_cast<size_t>(B * k), 1.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int j = 0; j < k; ++j)
      slot_expert_[static_cast<size_t>(b * k + j)] = all ? j : routed_[static_cast<size_t>(b)];
  comm::RoutingView rv;
  rv.n_tokens = B;
  rv.k = k;
  rv.expert = slot_expert_.data();
  rv.weight = slot_weight_.data();
  plan_ = std::make_unique<comm::DispatchPlan>(
      comm::DispatchPlan::build(rv, placement_, comm::PlanOptions{}, comm_));
  ++stats_.exchanges;
  const int64_t R = plan_->n_recv();
  View recv = scratch(recv_, R, W);
  exchange_.dispatch(*plan_, ConstView(xs_.data, B, W), recv);
  View out = scratch(expert_out_, R, W);
  const auto& offs = plan_->recv_offsets();
  for (size_t i = 0; i < experts_.size(); ++i) {
    Expert& e = *experts_[i];
    e.row0 = offs[i];
    e.n_seq = offs[i + 1] - offs[i];
    if (e.n_seq == 0) continue;
    ConstView y = e.blocks->forward(ConstView(recv.data + e.row0 * W, e.n_seq * S, d), e.n_seq);
    e.final_norm->forward(y, View(out.data + e.row0 * W, e.n_seq * S, d));
  }
  exchange_.combine(*plan_, out, scratch(h_home_, B * k, W));
  const comm::LoadStats& ls = plan_->stats();
  stats_.expert_sequences = ls.expert_tokens;
  stats_.expert_imbalance = ls.expert_imbalance;
  stats_.exchange_seconds = exchange_.stats().seconds;
  stats_.bytes_sent = exchange_.stats().bytes_sent;
}

double SingleGateModel::forward(SingleGatePhase phase, std::span<const int32_t> windows, int64_t B,
                                int64_t S, double normaliser) {
  const int64_t n = B * S, d = config_.d_model, V = config_.vocab_size;
  const int64_t E = config_.moe.n_experts;
  phase_ = phase;
  normaliser_ = normaliser;
  read_windows(windows, B, S);
  run_base(B, S);
  stats_.sequences = comm_.sum(B, "single_gate sequences");
  stats_.exited = 0;
  View ze;
  if (phase == SingleGatePhase::kBase) {
    ConstView y = base_later_->forward(xs_, B);
    View hf = scratch(h_full_, n, d);
    final_norm_->forward(y, hf);
    ze = head_->logits_for_backward(hf);
    stats_.expert_imbalance = 0;
  } else if (phase == SingleGatePhase::kExperts) {
    choose_experts(B);
    run_experts(B, S, false);
    ze = head_->logits_for_backward(ConstView(h_home_.data(), n, d));
  } else {
    // Every sequence under every expert; the gate learns the best one.
    run_experts(B, S, true);
    choose_experts(B);
    best_.assign(static_cast<size_t>(B), 0);
    View gl(gate_logits_.data(), B, E);
    double loss = 0, hits = 0;
    for (int64_t b = 0; b < B; ++b) {
      double best_loss = std::numeric_limits<double>::infinity();
      for (int64_t e = 0; e < E; ++e) {
        ConstView z = head_->logits(ConstView(h_home_.data() + (b * E + e) * S * d, S, d));
        double l = 0;
        for (int64_t t = 0; t < S; ++t) {
          const int32_t tgt = targets_[static_cast<size_t>(b * S + t)];
          if (tgt >= 0)
            l += ensemble_row(zb_.row(b * S + t), z.row(t), V, tgt, sg_.ensemble, nullptr, nullptr,
                              0);
        }
        if (l < best_loss) {
          best_loss = l;
          best_[static_cast<size_t>(b)] = static_cast<int32_t>(e);
        }
      }
      // Gate cross-entropy towards the best expert; dlogits kept in gate_logits_.
      float* g = gl.row(b);
      const int32_t tgt = best_[static_cast<size_t>(b)];
      const double lse = log_sum_exp(g, E);
      loss += lse - g[tgt];
      hits += routed_[static_cast<size_t>(b)] == tgt;
      for (int64_t e = 0; e < E; ++e)
        g[e] = static_cast<float>((std::exp(double(g[e]) - lse) - (e == tgt)) / normaliser);
    }
    stats_.gate_loss = comm_.sum(loss, "gate loss") / static_cast<double>(stats_.sequences);
    stats_.gate_accuracy = comm_.sum(hits, "gate hits") / static_cast<double>(stats_.sequences);
    return loss / normaliser;
  }
  // Row losses summed in row order: the result does not depend on the thread count.
  row_loss_.assign(static_cast<size_t>(n), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = targets_[static_cast<size_t>(i)];
    if (t < 0) {
      std::fill(zb_.row(i), zb_.row(i) + V, 0.0f);
      std::fill(ze.row(i), ze.row(i) + V, 0.0f);
      continue;
    }
    row_loss_[static_cast<size_t>(i)] = ensemble_row(zb_.row(i), ze.row(i), V, t, sg_.ensemble,
                                                     zb_.row(i), ze.row(i), 1.0 / normaliser);
  }
  if (sg_.ensemble >= 1) ze.fill(0.0f);  // a = 1: the expert has no part in the loss
  double loss = 0;
  for (double l : row_loss_) loss += l;
  return loss / normaliser;
}

void SingleGateModel::backward() {
  const int64_t B = n_seq_, S = seq_len_, n = B * S, d = config_.d_model, W = S * d;
  if (phase_ == SingleGatePhase::kGate) {
    const int64_t E = config_.moe.n_experts;
    ConstView dgl(gate_logits_.data(), B, E);
    if (B > 0) gemm(Trans::kYes, Trans::kNo, 1.0f, pooled(), dgl, 1.0f, dw_gate_.view());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = 0; e < E; ++e) db_gate_[e] += dgl(b, e);
    return;
  }
  View g = scratch(grad_, n, d), tmp = scratch(tmp_, n, d);
  if (phase_ == SingleGatePhase::kBase) {
    head_->backward(tmp);
    final_norm_->backward(tmp, g);
    base_later_->backward(g);
  } else {
    head_->backward(tmp);  // dL/d(expert outputs) at home, [B, S*d]
    const int64_t R = plan_->n_recv();
    View drecv = scratch(expert_out_, R, W);
    exchange_.dispatch(*plan_, ConstView(tmp.data, B, W), drecv);
    for (auto& e : experts_) {
      if (e->n_seq == 0) continue;
      View ge(drecv.data + e->row0 * W, e->n_seq * S, d);
      e->final_norm->backward(ge, ge);
      e->blocks->backward(ge);
    }
    exchange_.combine(*plan_, drecv, View(g.data, B, W));  // exited sequences: zeros
    stats_.exchange_seconds = exchange_.stats().seconds;
    stats_.bytes_sent = exchange_.stats().bytes_sent;
  }
  // The base branch, then the shared blocks and the embedding (fixed in kExperts with
  // freeze_base: their gradients would not be used).
  if (phase_ == SingleGatePhase::kExperts && sg_.freeze_base) return;
  base_head_->backward(tmp);
  base_norm_->backward(tmp, tmp);
  add_into(g, tmp);
  shared_->backward(g);
  embed_->backward(g);
}

double SingleGateModel::score(std::span<const int32_t> windows, int64_t B, int64_t S,
                              double normaliser) {
  const int64_t n = B * S, d = config_.d_model, V = config_.vocab_size;
  phase_ = SingleGatePhase::kExperts;
  read_windows(windows, B, S);
  run_base(B, S);
  choose_experts(B);
  // Base confidence c_b = mean_t max_v softmax(z_b); exits when above the threshold.
  int64_t remaining = 0;
  for (int64_t b = 0; b < B; ++b) {
    double c = 0;
    for (int64_t t = 0; t < S; ++t) {
      const float* z = zb_.row(b * S + t);
      c += std::exp(double(*std::max_element(z, z + V)) - log_sum_exp(z, V));
    }
    if (c / static_cast<double>(S) > sg_.exit_threshold)
      routed_[static_cast<size_t>(b)] = -1;
    else
      ++remaining;
  }
  stats_.exited = B - remaining;
  // threshold <= 0: every confidence is above it, known on every rank: no collective at all.
  const bool exchange = sg_.exit_threshold > 0 && comm_.sum(remaining, "single_gate exit") > 0;
  ConstView ze;
  if (exchange) {
    run_experts(B, S, false);
    ze = head_->logits(ConstView(h_home_.data(), n, d));
  }
  double loss = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = targets_[static_cast<size_t>(i)];
    if (t < 0) continue;
    const bool exited = routed_[static_cast<size_t>(i / S)] < 0;
    loss += ensemble_row(zb_.row(i), exited ? nullptr : ze.row(i), V, t,
                         exited ? 1.0 : sg_.ensemble, nullptr, nullptr, 0);
  }
  return loss / normaliser;
}

}  // namespace moe::model
