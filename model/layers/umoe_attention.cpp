#include "model/layers/umoe_attention.hpp"

#include <cmath>
#include <limits>

#include <omp.h>

#include "model/buffers.hpp"
#include "model/layers/activation.hpp"
#include "model/routers/topk.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

UmoeConfig UmoeConfig::from(const Config& c) {
  UmoeConfig u;
  u.top_k = static_cast<int>(c.get_int("model.umoe.top_k"));
  u.d_qk = c.get_int("model.umoe.d_qk");
  u.query_rank = c.get_int("model.umoe.query_rank");
  u.shared_experts = static_cast<int>(c.get_int("model.umoe.shared_experts"));
  u.renormalize = c.get_bool("model.umoe.renormalize");
  u.aux_loss_coef = c.get_float("model.umoe.aux_loss_coef");
  u.rope_base = c.get_float("model.rope_base");
  if (u.d_qk % 2 != 0)
    throw Error(ErrorKind::kConfig,
                cat("model.umoe.d_qk = ", u.d_qk, " must be even (RoPE rotates pairs)"));
  return u;
}

UmoeAttention::UmoeAttention(std::string name, int64_t d_model, const UmoeConfig& config,
                             const MoeConfig& moe, const comm::ExpertPlacement& placement,
                             const comm::Communicator& comm, uint64_t seed)
    : name_(std::move(name)),
      d_(d_model),
      dqk_(config.d_qk),
      r_(config.query_rank),
      E_(moe.n_experts),
      config_(config),
      moe_(moe),
      placement_(placement),
      comm_(comm),
      experts_(d_model, moe.d_ff, moe.activation, placement.local_experts(comm.rank()), seed),
      ex_(comm, name_ + ".exchange"),
      rope_(config.d_qk, config.rope_base),
      w_q_({d_model, config.d_qk}),
      dw_q_({d_model, config.d_qk}),
      w_k_({d_model, config.d_qk}),
      dw_k_({d_model, config.d_qk}),
      w_a_({d_model, (moe.n_experts + config.shared_experts) * config.query_rank}),
      dw_a_({d_model, (moe.n_experts + config.shared_experts) * config.query_rank}),
      w_b_({(moe.n_experts + config.shared_experts) * config.query_rank, config.d_qk}),
      dw_b_({(moe.n_experts + config.shared_experts) * config.query_rank, config.d_qk}),
      rope_decode_(config.d_qk, config.rope_base) {
  if (placement.n_experts() != moe.n_experts || placement.n_ranks() != comm.size())
    throw Error(
        ErrorKind::kConfig,
        cat(name_, ": placement has ", placement.n_experts(), " experts over ", placement.n_ranks(),
            " ranks; the layer has ", moe.n_experts, " experts over ", comm.size(), " ranks"));
  if (config.top_k < 1 || config.top_k > moe.n_experts)
    throw Error(ErrorKind::kConfig,
                cat("model.umoe.top_k = ", config.top_k,
                    " must be in [1, model.moe.num_experts = ", moe.n_experts, "]"));
  if (config.d_qk < 2 || config.d_qk % 2 != 0 || config.query_rank < 1 || config.shared_experts < 0)
    throw Error(
        ErrorKind::kConfig,
        cat(name_, ": d_qk = ", config.d_qk, " (even, >= 2), query_rank = ", config.query_rank,
            " (>= 1), shared_experts = ", config.shared_experts, " (>= 0)"));
  // The router's weights get their own seed, so the block's FFN router starts different.
  const uint64_t rseed = seed ^ init_stream((name_ + ".router").c_str(), 0);
  TopKOptions o{moe.n_experts, config.top_k, config.renormalize, config.aux_loss_coef,
                config.z_loss_coef};
  o.sequence_balance = true;  // the paper's sequence-level load-balancing loss
  router_ = std::make_unique<TopKRouter>(d_model, o, &comm, rseed);
  const float bd = 1.0f / std::sqrt(static_cast<float>(d_model));
  init_uniform(w_q_.view(), bd, seed, init_stream((name_ + ".w_q").c_str(), 0));
  init_uniform(w_k_.view(), bd, seed, init_stream((name_ + ".w_k").c_str(), 0));
  init_uniform(w_a_.view(), bd, seed, init_stream((name_ + ".w_a").c_str(), 0));
  // W_b starts small, so every expert's query starts near the shared one.
  init_uniform(w_b_.view(), 0.1f / std::sqrt(static_cast<float>(r_)), seed,
               init_stream((name_ + ".w_b").c_str(), 0));
  for (int s = 0; s < config.shared_experts; ++s)
    shared_.push_back(
        std::make_unique<Ffn>(cat(name_, ".shared.", s), d_model, moe.d_ff, moe.activation, seed));
  routed_.m = config.top_k;
  shared_mix_.m = config.shared_experts;
  zero_grad();
}

std::vector<ParamRef> UmoeAttention::replicated_params() {
  std::vector<ParamRef> out = router_->params();
  out.push_back({"w_q", w_q_.view(), dw_q_.view()});
  out.push_back({"w_k", w_k_.view(), dw_k_.view()});
  out.push_back({"w_a", w_a_.view(), dw_a_.view()});
  out.push_back({"w_b", w_b_.view(), dw_b_.view()});
  for (size_t s = 0; s < shared_.size(); ++s)
    for (ParamRef p : shared_[s]->params()) {
      p.name = cat("shared.", s, ".", p.name.substr(p.name.rfind('.') + 1));
      out.push_back(std::move(p));
    }
  return out;
}

std::vector<ParamRef> UmoeAttention::params() {
  std::vector<ParamRef> out = replicated_params();
  for (ParamRef& p : experts_.params()) out.push_back(std::move(p));
  for (ParamRef& p : out) p.name = name_ + "." + p.name;
  return out;
}

void UmoeAttention::zero_grad() {
  for (ParamRef& p : replicated_params()) p.grad.fill(0.0f);
  experts_.zero_grad();
}

ConstView UmoeAttention::probs(int64_t b, int j) const {
  const int m = routed_.m;
  return ConstView(routed_.probs.data() + (b * s_ * m + j) * s_, s_, s_, m * s_);
}

int UmoeAttention::expert_of(const Mix& g, int64_t t, int j) const {
  if (&g == &routed_) return route_.expert[static_cast<size_t>(t * route_.k + j)];
  return E_ + j;
}

// q rows (t, j) = RoPE(qb_t + rms(u_t[i r, (i+1) r]) W_b^i), i = expert_of(t, j).
void UmoeAttention::queries_forward(Mix& g, ConstView x) {
  const int64_t T = x.rows, m = g.m, r = r_, dqk = dqk_;
  if (m == 0) return;
  View q = scratch(g.q, T * m, dqk), v = scratch(g.v, T * m, r), inv = scratch(g.inv, T * m, 1);
  ConstView u(u_.data(), T, (E_ + config_.shared_experts) * r);
  const float eps = config_.norm_eps;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < m; ++j) {
      const int64_t row = t * m + j;
      const int e = expert_of(g, t, j);
      float* qr = q.row(row);
      float* vr = v.row(row);
      const float* qbr = qb_.data() + t * dqk;
      for (int64_t c = 0; c < dqk; ++c) qr[c] = qbr[c];
      if (e < 0) {  // empty slot: no correction
        for (int64_t c = 0; c < r; ++c) vr[c] = 0.0f;
        inv(row, 0) = 0.0f;
        continue;
      }
      const float* ur = u.row(t) + e * r;
      double ss = 0.0;
      for (int64_t c = 0; c < r; ++c) ss += double(ur[c]) * ur[c];
      const float iv = static_cast<float>(1.0 / std::sqrt(ss / double(r) + eps));
      inv(row, 0) = iv;
      for (int64_t c = 0; c < r; ++c) vr[c] = ur[c] * iv;
      const float* wb = w_b_.data() + e * r * dqk;
      for (int64_t c = 0; c < r; ++c) {
        const float vc = vr[c];
        const float* wr = wb + c * dqk;
#pragma omp simd
        for (int64_t o = 0; o < dqk; ++o) qr[o] += vc * wr[o];
      }
    }
}

// RoPE on full sequences: query j of sequence b is a strided [S, d_qk] view (rows s*m + j).
void UmoeAttention::queries_rotate(Mix& g) {
  const int64_t m = g.m, S = s_, dqk = dqk_;
  if (m == 0) return;
  float* q = g.q.data();
#pragma omp parallel for schedule(static)
  for (int64_t bj = 0; bj < n_seq_ * m; ++bj) {
    const int64_t b = bj / m, j = bj % m;
    rope_.apply(View(q + ((b * S) * m + j) * dqk, S, dqk, m * dqk));
  }
}

// probs = causal softmax(q K^T / sqrt(d_qk)) per sequence; z = probs X.
void UmoeAttention::mix_forward(Mix& g, ConstView x) {
  const int64_t T = x.rows, m = g.m, S = s_, d = d_, dqk = dqk_;
  if (m == 0) return;
  View p = scratch(g.probs, T * m, S), z = scratch(g.z, T * m, d);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dqk));
  ConstView q(g.q.data(), T * m, dqk), k(k_.data(), T, dqk);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < n_seq_; ++b) {
    View pb = p.row_range(b * S * m, S * m);
    gemm(Trans::kNo, Trans::kYes, scale, q.row_range(b * S * m, S * m), k.row_range(b * S, S), 0.0f,
         pb);
    // Query i sits at position i / m: keys 0 .. i / m are visible.
    for (int64_t i = 0; i < S * m; ++i) act::softmax_causal_row_exact(pb.row(i), i / m, S);
    gemm(Trans::kNo, Trans::kNo, 1.0f, pb, x.row_range(b * S, S), 0.0f,
         z.row_range(b * S * m, S * m));
  }
}

void UmoeAttention::forward(ConstView x, int64_t n_seq, View y) {
  const int64_t T = x.rows, d = d_, dqk = dqk_;
  MOE_CHECK_SHAPE(x, T, d, cat(name_, ".forward x"));
  MOE_CHECK_SHAPE(y, T, d, cat(name_, ".forward y"));
  MOE_CHECK(n_seq >= 0 && (n_seq == 0 ? T == 0 : T % n_seq == 0), name_, ".forward: ", T,
            " tokens are not ", n_seq, " whole sequences");
  x_ = x;
  n_seq_ = n_seq;
  s_ = n_seq == 0 ? 0 : T / n_seq;
  const comm::ExchangeStats s0 = ex_.stats();
  const int64_t nq = E_ + config_.shared_experts;

  // route (collective: global load statistics; the balance loss per sequence)
  std::vector<int64_t> seq_row0(static_cast<size_t>(n_seq) + 1);
  for (int64_t b = 0; b <= n_seq; ++b) seq_row0[static_cast<size_t>(b)] = b * s_;
  router_->set_sequences(std::move(seq_row0));
  router_->forward(x, route_);
  const int k = route_.k;
  routed_.m = k;

  // shared query, key and every expert's x W_a: three GEMMs over all tokens
  View qb = scratch(qb_, T, dqk), kk = scratch(k_, T, dqk), u = scratch(u_, T, nq * r_);
  if (T > 0) {
    gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_q_.view(), 0.0f, qb);
    gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_k_.view(), 0.0f, kk);
    gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_a_.view(), 0.0f, u);
  }
  rope_.prepare(0, std::max<int64_t>(s_, 1));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_seq_; ++b) rope_.apply(kk.row_range(b * s_, s_));

  // queries and mixing, on this rank (the token's owner)
  queries_forward(routed_, x);
  queries_rotate(routed_);
  mix_forward(routed_, x);
  queries_forward(shared_mix_, x);
  queries_rotate(shared_mix_);
  mix_forward(shared_mix_, x);
  experts_forward(T, y);

  stats_ = UmoeStats{};
  stats_.aux_loss = route_.aux_loss;
  stats_.load_balance_loss = route_.load_balance_loss;
  stats_.z_loss = route_.z_loss;
  stats_.load = plan_.stats();
  stats_.bytes_sent = ex_.stats().bytes_sent - s0.bytes_sent;
  stats_.exchange_seconds = ex_.stats().seconds - s0.seconds;
}

// Routed experts on routed_.z (slot rows -> owners -> experts -> back, weighted by p), plus the
// shared experts on shared_mix_.z: y [T, d] (overwritten). Collective.
void UmoeAttention::experts_forward(int64_t T, View y) {
  const int64_t d = d_;
  const int k = route_.k;
  plan_ = comm::DispatchPlan::build(route_.routing(), placement_, comm::PlanOptions{}, comm_);
  const int64_t R = plan_.n_recv();
  View xin = scratch(xin_, R, d), yout = scratch(yout_, R, d);
  View slot_out = scratch(slot_out_, T * k, d);
  ex_.dispatch_slots(plan_, ConstView(routed_.z.data(), T * k, d), xin);
  experts_.forward(xin, plan_.recv_offsets(), yout, cache_);
  ex_.combine(plan_, yout, slot_out);
  combine_weighted(slot_out, route_.weight.data(), plan_.kept(), k, y);

  // shared experts, each on its own mixture (rows t*n_s + s)
  const int ns = config_.shared_experts;
  for (int s = 0; s < ns; ++s) {
    View o = scratch(shared_out_, T, d);
    shared_[s]->forward(ConstView(shared_mix_.z.data() + s * d, T, d, ns * d), o);
    add_into(y, o);
  }
}

void UmoeAttention::forward_cached(ConstView x, std::span<const int64_t> n_new,
                                   std::span<KvCache* const> caches, View y) {
  const int64_t B = static_cast<int64_t>(n_new.size()), d = d_, dqk = dqk_;
  const int64_t max_end = std::max<int64_t>(1, stack_cached_rows(name_, d, n_new, caches, row0_));
  const int64_t T = row0_.back(), nq = E_ + config_.shared_experts;
  MOE_CHECK_SHAPE(x, T, d, cat(name_, ".forward_cached x"));
  MOE_CHECK_SHAPE(y, T, d, cat(name_, ".forward_cached y"));
  MOE_CHECK(dqk <= d, name_, ": d_qk ", dqk, " > d_model ", d, " does not fit the KV cache");
  if (rope_decode_.n_pos() < max_end) rope_decode_.prepare(0, max_end);
  router_->set_sequences(row0_);  // the balance loss over each sequence's new tokens
  router_->forward(x, route_);    // collective, also with T = 0
  routed_.m = route_.k;
  View qb = scratch(qb_, T, dqk), kk = scratch(k_, T, dqk), u = scratch(u_, T, nq * r_);
  if (T > 0) {
    gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_q_.view(), 0.0f, qb);
    gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_k_.view(), 0.0f, kk);
    gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_a_.view(), 0.0f, u);
  }
  queries_forward(routed_, x);
  queries_forward(shared_mix_, x);
  if (scores_.size() < static_cast<size_t>(omp_get_max_threads()))
    scores_.resize(static_cast<size_t>(omp_get_max_threads()));
  scratch(routed_.z, T * routed_.m, d);  // sized before the threads write their rows
  scratch(shared_mix_.z, T * shared_mix_.m, d);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dqk));
  // The cache: k [cap, d] holds the rotated key in columns [0, d_qk); v [cap, d] holds X.
#pragma omp parallel
  {
    Tensor& sc = scores_[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      KvCache& c = *caches[static_cast<size_t>(b)];
      const int64_t r0 = row0_[static_cast<size_t>(b)], nb = n_new[static_cast<size_t>(b)];
      const int64_t past = c.len, total = past + nb;
      View kn = kk.row_range(r0, nb);
      rope_decode_.apply_at(kn, past);
      copy(kn, c.k.view().row_range(past, nb).col_range(0, dqk));
      copy(x.row_range(r0, nb), c.v.view().row_range(past, nb));
      ConstView kc = ConstView(c.k.view()).row_range(0, total).col_range(0, dqk);
      ConstView vc = ConstView(c.v.view()).row_range(0, total);
      for (Mix* g : {&routed_, &shared_mix_}) {
        const int64_t m = g->m;
        if (m == 0) continue;
        View q = View(g->q.data(), T * m, dqk).row_range(r0 * m, nb * m);
        for (int64_t i = 0; i < nb * m; ++i) rope_decode_.apply_at(q.row_range(i, 1), past + i / m);
        View p = scratch(sc, nb * m, total);
        gemm(Trans::kNo, Trans::kYes, scale, q, kc, 0.0f, p);
        for (int64_t i = 0; i < nb * m; ++i)  // keys 0 .. past + i / m are visible
          act::softmax_causal_row_exact(p.row(i), past + i / m, total);
        View z = View(g->z.data(), T * m, d).row_range(r0 * m, nb * m);
        gemm(Trans::kNo, Trans::kNo, 1.0f, p, vc, 0.0f, z);
      }
      c.len = total;
    }
  }
  experts_forward(T, y);
}

// Given dL/dz in g.z: dx += probs^T dz (values); dS = P (dP - rowdot(dP, P)) / sqrt(d_qk) with
// dP = dz X^T; dq = dS K (into g.q, then un-rotated); dk += dS^T q (rotated).
void UmoeAttention::mix_backward(Mix& g, ConstView x, View dx, View dk) {
  const int64_t T = x.rows, m = g.m, S = s_, d = d_, dqk = dqk_;
  if (m == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dqk));
  View p(g.probs.data(), T * m, S), dz(g.z.data(), T * m, d), q(g.q.data(), T * m, dqk);
  ConstView k(k_.data(), T, dqk);
  dp_.resize(static_cast<size_t>(omp_get_max_threads()));
#pragma omp parallel
  {
    Tensor& dp_buf = dp_[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < n_seq_; ++b) {
      View pb = p.row_range(b * S * m, S * m), qbv = q.row_range(b * S * m, S * m);
      ConstView dzb = dz.row_range(b * S * m, S * m), xb = x.row_range(b * S, S);
      View dp = scratch(dp_buf, S * m, S);
      gemm(Trans::kNo, Trans::kYes, 1.0f, dzb, xb, 0.0f, dp);                      // dP = dz X^T
      gemm(Trans::kYes, Trans::kNo, 1.0f, pb, dzb, 1.0f, dx.row_range(b * S, S));  // dX += P^T dz
      for (int64_t i = 0; i < S * m; ++i) {
        float* pr = pb.row(i);
        const float* dr = dp.row(i);
        double dot = 0.0;
        for (int64_t c = 0; c < S; ++c) dot += double(pr[c]) * dr[c];
        const float fd = static_cast<float>(dot);
        for (int64_t c = 0; c < S; ++c) pr[c] = scale * pr[c] * (dr[c] - fd);  // dS
      }
      gemm(Trans::kYes, Trans::kNo, 1.0f, pb, qbv, 1.0f, dk.row_range(b * S, S));  // dk += dS^T q
      gemm(Trans::kNo, Trans::kNo, 1.0f, pb, k.row_range(b * S, S), 0.0f, qbv);    // dq = dS K
      for (int64_t j = 0; j < m; ++j)
        rope_.apply_transpose(View(q.data + ((b * S) * m + j) * dqk, S, dqk, m * dqk));
    }
  }
}

// Given dL/dq in g.q: dqb_t += sum_j dq_tj; per slot with expert i: dW_b^i += v^T dq,
// dv = dq W_b^i^T, du_t[i r ..] = (dv - v mean(v dv)) / rms.
void UmoeAttention::queries_backward(Mix& g, View dqb, View du) {
  const int64_t T = dqb.rows, m = g.m, r = r_, dqk = dqk_;
  if (m == 0) return;
  ConstView dq(g.q.data(), T * m, dqk), v(g.v.data(), T * m, r);
  const float* inv = g.inv.data();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* qr = dqb.row(t);
    for (int j = 0; j < m; ++j) {
      const int64_t row = t * m + j;
      const float* dr = dq.row(row);
      for (int64_t c = 0; c < dqk; ++c) qr[c] += dr[c];
      const int e = expert_of(g, t, j);
      if (e < 0) continue;
      const float* wb = w_b_.data() + e * r * dqk;
      const float* vr = v.row(row);
      float* ur = du.row(t) + e * r;  // distinct experts per token: no two slots share it
      double dot = 0.0;
      for (int64_t c = 0; c < r; ++c) {  // dv, kept in du's slice
        double a = 0.0;
        const float* wr = wb + c * dqk;
        for (int64_t o = 0; o < dqk; ++o) a += double(dr[o]) * wr[o];
        ur[c] = static_cast<float>(a);
        dot += a * vr[c];
      }
      const float mean = static_cast<float>(dot / double(r));
      for (int64_t c = 0; c < r; ++c) ur[c] = (ur[c] - vr[c] * mean) * inv[row];
    }
  }
  // dW_b^i += v^T dq over the slots of expert i: serial over slots, vectorised inside.
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < m; ++j) {
      const int e = expert_of(g, t, j);
      if (e < 0) continue;
      const int64_t row = t * m + j;
      const float* dr = dq.row(row);
      const float* vr = v.row(row);
      float* gb = dw_b_.data() + e * r * dqk;
      for (int64_t c = 0; c < r; ++c) {
        const float vc = vr[c];
        float* gr = gb + c * dqk;
#pragma omp simd
        for (int64_t o = 0; o < dqk; ++o) gr[o] += vc * dr[o];
      }
    }
}

void UmoeAttention::backward(ConstView dy, View dx, float aux_scale) {
  const int64_t T = x_.rows, d = d_, dqk = dqk_;
  const int k = route_.k, ns = config_.shared_experts;
  MOE_CHECK_SHAPE(dy, T, d, cat(name_, ".backward dy"));
  MOE_CHECK_SHAPE(dx, T, d, cat(name_, ".backward dx"));
  const comm::ExchangeStats s0 = ex_.stats();
  const std::vector<uint8_t>& kept = plan_.kept();
  const float* w = route_.weight.data();

  // shared experts^T: dz_s (rows t*n_s + s of shared_mix_.z)
  for (int s = 0; s < ns; ++s)
    shared_[s]->backward(dy, View(shared_mix_.z.data() + s * d, T, d, ns * d));

  // combine^T, local: dweight_tj = <dy_t, slot_out_tj>, ds_tj = p_tj dy_t
  View dweight = scratch(dweight_, T, k), ds = scratch(ds_, T * k, d);
  ConstView slot_out(slot_out_.data(), T * k, d);
  combine_transpose(dy, slot_out, w, kept, k, dweight, ds);
  const int64_t R = plan_.n_recv();
  View dyin(yout_.data(), R, d), dxin(xin_.data(), R, d);
  ex_.dispatch_slots(plan_, ds, dyin);    // combine^T
  experts_.backward(dyin, dxin, cache_);  // experts^T (accumulates the shared bank's grads)
  View dz(routed_.z.data(), T * k, d);
  ex_.combine(plan_, dxin, dz);  // dispatch^T: dL/dz per slot (zeros for empty)

  // mixing^T for both groups: dx (values part), dq, dk
  dx.fill(0.0f);
  View dk = scratch(dk_, T, dqk);
  dk.fill(0.0f);
  mix_backward(routed_, x_, dx, dk);
  mix_backward(shared_mix_, x_, dx, dk);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_seq_; ++b) rope_.apply_transpose(dk.row_range(b * s_, s_));

  // queries^T: dqb (sum over a token's queries) and du (every expert's x W_a columns)
  const int64_t nq = E_ + ns;
  View dqb(qb_.data(), T, dqk), du(u_.data(), T, nq * r_);
  dqb.fill(0.0f);
  du.fill(0.0f);
  queries_backward(routed_, dqb, du);
  queries_backward(shared_mix_, dqb, du);
  if (T > 0) {
    gemm(Trans::kYes, Trans::kNo, 1.0f, x_, dqb, 1.0f, dw_q_.view());
    gemm(Trans::kYes, Trans::kNo, 1.0f, x_, dk, 1.0f, dw_k_.view());
    gemm(Trans::kYes, Trans::kNo, 1.0f, x_, du, 1.0f, dw_a_.view());
    gemm(Trans::kNo, Trans::kYes, 1.0f, dqb, w_q_.view(), 1.0f, dx);
    gemm(Trans::kNo, Trans::kYes, 1.0f, dk, w_k_.view(), 1.0f, dx);
    gemm(Trans::kNo, Trans::kYes, 1.0f, du, w_a_.view(), 1.0f, dx);
  }
  router_->backward(dweight, aux_scale, dx);  // route^T: dx += ..., dW_r

  stats_.bytes_sent += ex_.stats().bytes_sent - s0.bytes_sent;
  stats_.exchange_seconds += ex_.stats().seconds - s0.seconds;
}

}  // namespace moe::model
