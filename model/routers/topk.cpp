#include "model/routers/topk.hpp"

#include <algorithm>
#include <cmath>

#include "model/buffers.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

TopKRouter::TopKRouter(int64_t d_model, const TopKOptions& options, const comm::Communicator* comm,
                       uint64_t seed)
    : d_(d_model), options_(options), comm_(comm) {
  if (options.n_experts < 1 || options.k < 1 || options.k > options.n_experts)
    throw Error(ErrorKind::kConfig, cat("top-k router: need 1 <= k <= num_experts, got k = ",
                                        options.k, ", num_experts = ", options.n_experts));
  MOE_CHECK(d_model >= 1, "top-k router: d_model ", d_model);
  w_ = Tensor({d_, options.n_experts});
  dw_ = Tensor({d_, options.n_experts});
  bias_ = Tensor({1, options.n_experts});
  bias_.zero();
  load_.assign(static_cast<size_t>(options.n_experts), 0.0);
  if (options_.bias_balance) options_.aux_loss_coef = 0.0;  // the bias balances instead
  init_uniform(w_.view(), 1.0f / std::sqrt(static_cast<float>(d_)), seed,
               init_stream("router.topk.w", 0));
}

std::vector<ParamRef> TopKRouter::params() {
  return {{"router.w", w_.view(), dw_.view()}};
}

std::vector<std::pair<std::string, View>> TopKRouter::buffers() {
  if (!options_.bias_balance) return {};
  return {{"router.bias", bias_.view()}};
}

void TopKRouter::end_step(bool applied) {
  if (!options_.bias_balance) return;
  const int E = options_.n_experts;
  if (applied) {
    double mean = 0.0;
    for (int i = 0; i < E; ++i) mean += load_[i];
    mean /= E;
    const float gamma = static_cast<float>(options_.bias_update_rate);
    for (int i = 0; i < E; ++i) {
      // sign(mean - load_i): underloaded experts become more attractive, overloaded less.
      const float dir = load_[i] < mean ? 1.0f : (load_[i] > mean ? -1.0f : 0.0f);
      bias_[i] += gamma * dir;
    }
  }
  std::fill(load_.begin(), load_.end(), 0.0);
}

void TopKRouter::forward(ConstView x, RouteResult& out) {
  run(x, out, /*global=*/true);
}

void TopKRouter::infer(ConstView x, RouteResult& out) {
  run(x, out, /*global=*/false);
}

void TopKRouter::run(ConstView x, RouteResult& out, bool global) {
  const int64_t T = x.rows;
  const int E = options_.n_experts, k = options_.k;
  MOE_CHECK_SHAPE(x, T, d_, "topk_router.forward x");
  Cache& c = cache_;
  c.x = x;
  View probs = scratch(c.probs, T, E);
  gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_.view(), 0.0f, probs);  // logits
  c.lse.resize(T);
  c.expert.resize(T * k);
  c.weight.resize(T * k);
  const bool biased = options_.bias_balance;
  const float* bias = bias_.data();
  const float skew = static_cast<float>(options_.skew);

  // Local statistics, reduced below in one all-reduce: [count E | prob sum E | z sum | T |
  // rank- or sequence-scope load-balancing loss sum | sequences].
  const bool by_seq = options_.sequence_balance;
  std::vector<double> stats(2 * E + 4, 0.0);
#pragma omp parallel
  {
    std::vector<double> local(2 * E + 1, 0.0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* p = probs.row(t);
      const double lse = softmax_inplace(p, E);
      c.lse[t] = static_cast<float>(lse);
      // Top-k by (p [+ b] descending, id ascending): k passes, each taking the best remaining.
      int32_t* ids = &c.expert[t * k];
      float* w = &c.weight[t * k];
      double sel = 0.0;
      auto score = [&](int i) { return (biased ? p[i] + bias[i] : p[i]) + (i == 0 ? skew : 0.0f); };
      for (int j = 0; j < k; ++j) {
        int best = -1;
        for (int i = 0; i < E; ++i) {
          bool taken = false;
          for (int q = 0; q < j; ++q) taken |= ids[q] == i;
          if (!taken && (best < 0 || score(i) > score(best))) best = i;
        }
        ids[j] = best;
        w[j] = p[best];
        sel += p[best];
        local[best] += 1.0;
      }
      if (options_.renormalize)
        for (int j = 0; j < k; ++j) w[j] = static_cast<float>(w[j] / sel);
      for (int i = 0; i < E; ++i) local[E + i] += p[i];
      local[2 * E] += lse * lse;
    }
#pragma omp critical
    for (int i = 0; i < 2 * E + 1; ++i) stats[i] += local[i];
  }
  stats[2 * E + 1] = static_cast<double>(T);
  // Rank scope: this rank's own load-balancing loss, from its local statistics, before the
  // reduction; the reduction then sums the ranks' losses (slot 2E + 2) for the report.
  std::vector<double> local_f(E, 0.0);
  if (by_seq) {
    // Per-sequence f_i^s and P_i^s from this rank's whole sequences.
    MOE_CHECK(!seq_row0_.empty() && seq_row0_.front() == 0 && seq_row0_.back() == T,
              "topk_router: sequence scope needs set_sequences() covering the ", T, " rows");
    const int64_t B = static_cast<int64_t>(seq_row0_.size()) - 1;
    for (int64_t b = 0; b < B; ++b)
      MOE_CHECK(seq_row0_[b + 1] >= seq_row0_[b], "topk_router: sequence offsets decrease at ", b);
    c.seq_f.assign(static_cast<size_t>(B * E), 0.0);
    c.seq_of.resize(T);
    double lb_sum = 0.0, n_seq = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : lb_sum, n_seq)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r0 = seq_row0_[b], r1 = seq_row0_[b + 1];
      if (r1 == r0) continue;
      const double S = static_cast<double>(r1 - r0);
      double* f = &c.seq_f[b * E];
      std::vector<double> psum(E, 0.0);
      for (int64_t t = r0; t < r1; ++t) {
        c.seq_of[t] = static_cast<int32_t>(b);
        const float* p = probs.row(t);
        for (int i = 0; i < E; ++i) psum[i] += p[i];
        for (int j = 0; j < k; ++j) f[c.expert[t * k + j]] += 1.0;
      }
      double lb = 0.0;
      for (int i = 0; i < E; ++i) {
        f[i] /= S * k;
        lb += f[i] * psum[i] / S;
        f[i] /= S;  // kept as f_i^s / S_s for the backward
      }
      lb_sum += E * lb;
      n_seq += 1.0;
    }
    stats[2 * E + 2] = lb_sum;
    stats[2 * E + 3] = n_seq;
  } else if (!options_.global_balance && T > 0) {
    double lb = 0.0;
    for (int i = 0; i < E; ++i) {
      local_f[i] = stats[i] / (static_cast<double>(T) * k);
      lb += local_f[i] * (stats[E + i] / static_cast<double>(T));
    }
    stats[2 * E + 2] = E * lb;
  }
  const int n_ranks = comm_ && global ? comm_->size() : 1;
  if (comm_ && global)
    comm_->allreduce_sum(stats.data(), static_cast<int64_t>(stats.size()), "router stats");

  const double N = stats[2 * E + 1];
  c.n_global = N;
  c.balance_norm = by_seq                    ? stats[2 * E + 3]
                   : options_.global_balance ? N
                                             : static_cast<double>(T) * n_ranks;
  c.f.assign(E, 0.0);
  c.count.assign(stats.begin(), stats.begin() + E);
  out.prob_sum.assign(stats.begin() + E, stats.begin() + 2 * E);
  out.n_tokens = T;
  out.k = k;
  out.expert = c.expert;
  out.weight = c.weight;
  out.expert_slots.assign(E, 0);
  double lb = 0.0;
  for (int i = 0; i < E; ++i) {
    out.expert_slots[i] = static_cast<int64_t>(std::llround(stats[i]));
    if (N > 0) {
      c.f[i] = stats[i] / (N * k);
      lb += c.f[i] * (stats[E + i] / N);
    }
  }
  if (by_seq) {
    lb = stats[2 * E + 3] > 0 ? stats[2 * E + 2] / (E * stats[2 * E + 3]) : 0.0;
  } else if (!options_.global_balance) {
    c.f = local_f;
    lb = stats[2 * E + 2] / (E * n_ranks);  // mean of the ranks' losses
  }
  out.load_balance_loss = N > 0 ? E * lb : 0.0;
  out.z_loss = N > 0 ? stats[2 * E] / N : 0.0;
  out.aux_loss = options_.aux_loss_coef * out.load_balance_loss + options_.z_loss_coef * out.z_loss;
}

void TopKRouter::backward(ConstView dweight, float aux_scale, View dx) {
  Cache& c = cache_;
  const int64_t T = c.x.rows;
  const int E = options_.n_experts, k = options_.k;
  MOE_CHECK_SHAPE(dweight, T, k, "topk_router.backward dweight");
  MOE_CHECK_SHAPE(dx, T, d_, "topk_router.backward dx");
  // A training micro-step: its global load counts toward the next bias update (every rank
  // adds the same global counts, also with T = 0).
  if (options_.bias_balance)
    for (int i = 0; i < E; ++i) load_[i] += c.count.empty() ? 0.0 : c.count[i];
  if (T == 0) return;
  ConstView probs(c.probs.data(), T, E);
  View dlogits = scratch(c.dlogits, T, E);
  const double N = c.n_global;
  // dLB/dp_ti = E f_i / N (sequence scope: E f_i^s / (S_s n_seq));  dZ/dlogit_ti = 2 lse_t p_ti /
  // N.
  const bool by_seq = options_.sequence_balance;
  const double lb_norm = c.balance_norm;  // N (global), T * P (rank) or n_seq (sequence)
  const double lb_scale = lb_norm > 0 ? aux_scale * options_.aux_loss_coef * E / lb_norm : 0.0;
  const double z_scale = N > 0 ? aux_scale * options_.z_loss_coef * 2.0 / N : 0.0;
#pragma omp parallel
  {
    std::vector<double> dp(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      const float* p = probs.row(t);
      const int32_t* ids = &c.expert[t * k];
      const float* w = &c.weight[t * k];
      const float* dw = dweight.row(t);
      const double* f = by_seq ? &c.seq_f[static_cast<size_t>(c.seq_of[t]) * E] : c.f.data();
      for (int i = 0; i < E; ++i) dp[i] = lb_scale * f[i];
      if (options_.renormalize) {
        // w_j = p_j / S:  dp_j = (dw_j - sum_m dw_m w_m) / S
        double S = 0.0, dot = 0.0;
        for (int j = 0; j < k; ++j) S += p[ids[j]], dot += double(dw[j]) * w[j];
        for (int j = 0; j < k; ++j) dp[ids[j]] += (dw[j] - dot) / S;
      } else {
        for (int j = 0; j < k; ++j) dp[ids[j]] += dw[j];
      }
      double pdp = 0.0;
      for (int i = 0; i < E; ++i) pdp += p[i] * dp[i];
      const double zl = z_scale * c.lse[t];
      float* dl = dlogits.row(t);
      for (int i = 0; i < E; ++i) dl[i] = static_cast<float>(p[i] * (dp[i] - pdp + zl));
    }
  }
  gemm(Trans::kNo, Trans::kYes, 1.0f, dlogits, w_.view(), 1.0f, dx);
  gemm(Trans::kYes, Trans::kNo, 1.0f, c.x, dlogits, 1.0f, dw_.view());
}

}  // namespace moe::model
