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
  init_uniform(w_.view(), 1.0f / std::sqrt(static_cast<float>(d_)), seed,
               init_stream("router.topk.w", 0));
}

std::vector<ParamRef> TopKRouter::params() {
  return {{"router.w", w_.view(), dw_.view()}};
}

void TopKRouter::forward(ConstView x, RouteResult& out) {
  run(x, out, /*global=*/true);
}

void TopKRouter::route(ConstView x, RouteResult& out) {
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

  // Local statistics, reduced below in one all-reduce:
  // [count E | prob sum E | z sum | T | rank-scope load-balancing loss].
  std::vector<double> stats(2 * E + 3, 0.0);
#pragma omp parallel
  {
    std::vector<double> local(2 * E + 1, 0.0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* p = probs.row(t);
      float m = p[0];
      for (int i = 1; i < E; ++i) m = std::max(m, p[i]);
      double s = 0.0;
      for (int i = 0; i < E; ++i) {
        p[i] = std::exp(p[i] - m);
        s += p[i];
      }
      const float inv = static_cast<float>(1.0 / s);
      for (int i = 0; i < E; ++i) p[i] *= inv;
      const double lse = m + std::log(s);
      c.lse[t] = static_cast<float>(lse);
      // Top-k by (p descending, id ascending): k passes, each taking the best remaining.
      int32_t* ids = &c.expert[t * k];
      float* w = &c.weight[t * k];
      double sel = 0.0;
      for (int j = 0; j < k; ++j) {
        int best = -1;
        for (int i = 0; i < E; ++i) {
          bool taken = false;
          for (int q = 0; q < j; ++q) taken |= ids[q] == i;
          if (!taken && (best < 0 || p[i] > p[best])) best = i;
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
  if (!options_.global_balance && T > 0) {
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
  c.balance_norm = options_.global_balance ? N : static_cast<double>(T) * n_ranks;
  c.f.assign(E, 0.0);
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
  if (!options_.global_balance) {
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
  if (T == 0) return;
  ConstView probs(c.probs.data(), T, E);
  View dlogits = scratch(c.dlogits, T, E);
  const double N = c.n_global;
  // dLB/dp_ti = E f_i / N;  dZ/dlogit_ti = 2 lse_t p_ti / N.
  const double lb_norm = c.balance_norm;  // N (global scope) or T * P (rank scope)
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
      for (int i = 0; i < E; ++i) dp[i] = lb_scale * c.f[i];
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
