#include "model/routers/expert_choice.hpp"

#include <cmath>
#include <cstring>

#include "model/buffers.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {

namespace {

// The order key of a score: for s >= 0 the fp32 bit pattern orders like the value. NaN (and
// anything negative, which a softmax does not produce) ranks lowest.
uint32_t score_key(float s) {
  if (!(s >= 0.0f)) return 0;
  uint32_t u;
  std::memcpy(&u, &s, sizeof u);
  return u;
}

constexpr int kBuckets = 256;  // one byte of the key per radix round

}  // namespace

ExpertChoiceRouter::ExpertChoiceRouter(int64_t d_model, const ExpertChoiceOptions& options,
                                       const comm::Communicator* comm, uint64_t seed)
    : d_(d_model), options_(options), comm_(comm) {
  if (options.n_experts < 1 || !(options.capacity > 0.0))
    throw Error(ErrorKind::kConfig,
                cat("expert-choice router: need num_experts >= 1 and a capacity > 0, got ",
                    options.n_experts, " experts, capacity ", options.capacity));
  MOE_CHECK(d_model >= 1, "expert-choice router: d_model ", d_model);
  w_ = Tensor({d_, options.n_experts});
  dw_ = Tensor({d_, options.n_experts});
  init_uniform(w_.view(), 1.0f / std::sqrt(static_cast<float>(d_)), seed,
               init_stream("router.topk.w", 0));
}

std::vector<ParamRef> ExpertChoiceRouter::params() {
  return {{"router.w", w_.view(), dw_.view()}};
}

void ExpertChoiceRouter::forward(ConstView x, RouteResult& out) {
  const int64_t T = x.rows;
  const int E = options_.n_experts;
  MOE_CHECK_SHAPE(x, T, d_, "expert_choice_router.forward x");
  Cache& c = cache_;
  c.x = x;
  View probs = scratch(c.probs, T, E);
  gemm(Trans::kNo, Trans::kNo, 1.0f, x, w_.view(), 0.0f, probs);  // logits
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) softmax_inplace(probs.row(t), E);

  // Radix selection of each expert's c-th largest score over the global batch (see the header).
  // Round 0's all-reduce also carries N and the probability sums: [hist E*256 | N | psum E].
  const size_t n_hist = static_cast<size_t>(E) * kBuckets;
  std::vector<double> buf(n_hist + 1 + E, 0.0);
  std::vector<uint32_t> prefix(E, 0);  // the key bits found so far
  std::vector<int64_t> need(E, 0);     // tokens still to take among those matching prefix
  int64_t N = 0;
  for (int round = 0; round < 4; ++round) {
    const int shift = 24 - 8 * round;
    const uint32_t mask = round == 0 ? 0u : 0xFFFFFFFFu << (32 - 8 * round);
    std::fill(buf.begin(), buf.begin() + n_hist, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const float* p = probs.row(t);
      for (int e = 0; e < E; ++e) {
        const uint32_t key = score_key(p[e]);
        if ((key & mask) == prefix[e]) buf[size_t(e) * kBuckets + ((key >> shift) & 0xFF)] += 1.0;
      }
    }
    size_t n_reduce = n_hist;
    if (round == 0) {
      buf[n_hist] = static_cast<double>(T);
      for (int e = 0; e < E; ++e) buf[n_hist + 1 + e] = 0.0;
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) buf[n_hist + 1 + e] += probs(t, e);
      n_reduce = buf.size();
    }
    if (comm_) comm_->allreduce_sum(buf.data(), static_cast<int64_t>(n_reduce), "expert choice");
    if (round == 0) {
      N = static_cast<int64_t>(std::llround(buf[n_hist]));
      const double want = std::ceil(static_cast<double>(N) * options_.capacity / E);
      capacity_ = std::min<int64_t>(N, static_cast<int64_t>(want));
      std::fill(need.begin(), need.end(), capacity_);
    }
    for (int e = 0; e < E; ++e) {
      if (need[e] == 0) continue;  // c = 0: nothing to take
      int64_t above = 0;           // matching tokens in higher buckets (all taken)
      for (int b = kBuckets - 1; b >= 0; --b) {
        const int64_t h = static_cast<int64_t>(buf[size_t(e) * kBuckets + b]);
        if (above + h >= need[e]) {
          prefix[e] |= static_cast<uint32_t>(b) << shift;
          need[e] -= above;
          break;
        }
        above += h;
      }
    }
  }
  // Now key > prefix[e]: taken; key == prefix[e]: the first need[e] in global token order.
  // Ties per (rank, expert), so each rank knows how many lower ranks took before it.
  const int P = comm_ ? comm_->size() : 1, me = comm_ ? comm_->rank() : 0;
  std::vector<double> ties(static_cast<size_t>(P) * E, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e)
      if (need[e] > 0 && score_key(probs(t, e)) == prefix[e]) ties[size_t(me) * E + e] += 1.0;
  if (comm_) comm_->allreduce_sum(ties.data(), static_cast<int64_t>(ties.size()), "expert ties");
  std::vector<int64_t> tie_seen(E, 0);  // ties of lower ranks, then of earlier local tokens
  for (int r = 0; r < me; ++r)
    for (int e = 0; e < E; ++e) tie_seen[e] += static_cast<int64_t>(ties[size_t(r) * E + e]);

  // Choose, then lay the result out compactly: k = the most experts any local token got.
  std::vector<uint8_t> chosen(static_cast<size_t>(T) * E, 0);
  std::vector<int> n_chosen(static_cast<size_t>(T), 0);
  int k = 1;
  for (int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      if (need[e] == 0) continue;
      const uint32_t key = score_key(probs(t, e));
      const bool take = key > prefix[e] || (key == prefix[e] && tie_seen[e]++ < need[e]);
      chosen[size_t(t) * E + e] = take;
      n_chosen[t] += take;
    }
    k = std::max(k, n_chosen[t]);
  }
  c.k = k;
  c.expert.assign(static_cast<size_t>(T) * k, -1);
  out.n_tokens = T;
  out.k = k;
  out.weight.assign(static_cast<size_t>(T) * k, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    int j = 0;
    for (int e = 0; e < E; ++e)
      if (chosen[size_t(t) * E + e]) {
        c.expert[t * k + j] = e;
        out.weight[t * k + j] = probs(t, e);
        ++j;
      }
  }
  out.expert = c.expert;
  out.expert_slots.assign(E, capacity_);
  out.prob_sum.assign(buf.begin() + n_hist + 1, buf.end());
  out.load_balance_loss = out.z_loss = out.aux_loss = 0.0;
}

void ExpertChoiceRouter::backward(ConstView dweight, float /*aux_scale: no aux loss*/, View dx) {
  Cache& c = cache_;
  const int64_t T = c.x.rows;
  const int E = options_.n_experts, k = c.k;
  MOE_CHECK_SHAPE(dweight, T, k, "expert_choice_router.backward dweight");
  MOE_CHECK_SHAPE(dx, T, d_, "expert_choice_router.backward dx");
  if (T == 0) return;
  ConstView probs(c.probs.data(), T, E);
  View dlogits = scratch(c.dlogits, T, E);
#pragma omp parallel
  {
    std::vector<double> dp(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      const float* p = probs.row(t);
      std::fill(dp.begin(), dp.end(), 0.0);
      for (int j = 0; j < k; ++j) {
        const int32_t e = c.expert[t * k + j];
        if (e >= 0) dp[e] += dweight(t, j);
      }
      double pdp = 0.0;
      for (int i = 0; i < E; ++i) pdp += p[i] * dp[i];
      float* dl = dlogits.row(t);
      for (int i = 0; i < E; ++i) dl[i] = static_cast<float>(p[i] * (dp[i] - pdp));
    }
  }
  gemm(Trans::kNo, Trans::kYes, 1.0f, dlogits, w_.view(), 1.0f, dx);
  gemm(Trans::kYes, Trans::kNo, 1.0f, c.x, dlogits, 1.0f, dw_.view());
}

}  // namespace moe::model
