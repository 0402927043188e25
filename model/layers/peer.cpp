// File: peer.cpp — PEER layer; see peer.hpp.
#include "model/layers/peer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "comm/alltoallv.hpp"
#include "model/layers/activation.hpp"
#include "runtime/error.hpp"
#include "runtime/gemm.hpp"

namespace moe::model {
namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

PeerConfig PeerConfig::from(const Config& c) {
  PeerConfig p;
  p.n_sub_keys = static_cast<int>(c.get_int("model.peer.n_sub_keys"));
  p.heads = static_cast<int>(c.get_int("model.peer.heads"));
  p.top_k = static_cast<int>(c.get_int("model.peer.top_k"));
  p.d_key = c.get_int("model.peer.d_key");
  p.batch_norm = c.get_bool("model.peer.batch_norm");
  p.layer = static_cast<int>(c.get_int("model.peer.layer"));
  return p;
}

PeerLayer::PeerLayer(std::string name, int64_t d_model, const PeerConfig& config,
                     const comm::Communicator& comm, uint64_t seed)
    : name_(std::move(name)),
      d_(d_model),
      config_(config),
      comm_(comm),
      n_(config.n_sub_keys),
      H_(config.heads),
      k_(config.top_k),
      dk_(config.d_key),
      S_(int64_t{config.heads} * config.top_k) {
  if (dk_ < 2 || dk_ % 2 != 0)
    throw Error(ErrorKind::kConfig, cat("model.peer.d_key = ", dk_, " must be even and >= 2"));
  if (k_ < 1 || k_ > n_)
    throw Error(ErrorKind::kConfig,
                cat("model.peer.top_k = ", k_, " exceeds model.peer.n_sub_keys = ", n_,
                    " (each half retrieves top_k sub-keys)"));
  if (n_ < comm.size())
    throw Error(ErrorKind::kConfig,
                cat("model.peer.n_sub_keys = ", n_, " is smaller than the ", comm.size(),
                    " ranks: the expert tables are split in blocks of n_sub_keys rows"));
  placement_ = comm::ExpertPlacement::blocked(static_cast<int>(n_), comm.size());
  const std::vector<int>& mine = placement_.local_experts(comm.rank());
  block_begin_ = mine.front();
  block_end_ = mine.back() + 1;
  const int64_t C = H_ * dk_, h = dk_ / 2, rows = int64_t{block_end_ - block_begin_} * n_;

  wq_ = Tensor({d_, C});
  dwq_ = Tensor({d_, C});
  init_uniform(wq_.view(), 1.0f / std::sqrt(static_cast<float>(d_)), seed,
               init_stream((name_ + ".wq").c_str(), 0));
  gain_ = Tensor({1, C});
  gain_.fill(1.0f);
  dgain_ = Tensor({1, C});
  bias_ = Tensor({1, C});
  dbias_ = Tensor({1, C});
  run_mean_ = Tensor({1, C});
  run_var_ = Tensor({1, C});
  run_var_.fill(1.0f);
  keys1_ = Tensor({n_, h});
  keys2_ = Tensor({n_, h});
  dkeys1_ = Tensor({n_, h});
  dkeys2_ = Tensor({n_, h});
  const float kb = 1.0f / std::sqrt(static_cast<float>(h));
  init_uniform(keys1_.view(), kb, seed, init_stream((name_ + ".keys1").c_str(), 0));
  init_uniform(keys2_.view(), kb, seed, init_stream((name_ + ".keys2").c_str(), 0));
  // u: fan-in d; v: the output layer of an FFN whose width is the S active neurons.
  u_ = Tensor({rows, d_});
  v_ = Tensor({rows, d_});
  du_ = Tensor({rows, d_});
  dv_ = Tensor({rows, d_});
  const float ub = 1.0f / std::sqrt(static_cast<float>(d_));
  const float vb = 1.0f / std::sqrt(static_cast<float>(S_));
  for (int b = 0; b < n_blocks_local(); ++b) {
    const int g = block_begin_ + b;
    init_uniform(u_block(b), ub, seed, init_stream((name_ + ".u").c_str(), g));
    init_uniform(v_block(b), vb, seed, init_stream((name_ + ".v").c_str(), g));
  }
  is_touched_.assign(static_cast<size_t>(rows), 0);
  hits_.assign(static_cast<size_t>(rows), 0);
}

std::vector<ParamRef> PeerLayer::dense_params() {
  std::vector<ParamRef> p{{name_ + ".wq", wq_.view(), dwq_.view()}};
  if (config_.batch_norm) {
    p.push_back({name_ + ".query_norm.gain", gain_.view(), dgain_.view()});
    p.push_back({name_ + ".query_norm.bias", bias_.view(), dbias_.view()});
  }
  p.push_back({name_ + ".keys1", keys1_.view(), dkeys1_.view()});
  p.push_back({name_ + ".keys2", keys2_.view(), dkeys2_.view()});
  return p;
}

std::vector<ParamRef> PeerLayer::buffers() {
  if (!config_.batch_norm) return {};
  return {{name_ + ".query_norm.running_mean", run_mean_.view(), View()},
          {name_ + ".query_norm.running_var", run_var_.view(), View()}};
}

std::vector<ParamRef> PeerLayer::table_params() {
  ParamRef u{name_ + ".u", u_.view(), du_.view()};
  ParamRef v{name_ + ".v", v_.view(), dv_.view()};
  u.sparse_rows = &touched_;
  v.sparse_rows = &touched_;
  return {u, v};
}

void PeerLayer::zero_grad() {
  dwq_.zero();
  dgain_.zero();
  dbias_.zero();
  dkeys1_.zero();
  dkeys2_.zero();
  for (int64_t r : touched_) {
    std::fill_n(du_.data() + r * d_, d_, 0.0f);
    std::fill_n(dv_.data() + r * d_, d_, 0.0f);
    is_touched_[static_cast<size_t>(r)] = 0;
  }
  touched_.clear();
}

double PeerLayer::exchange_rows(const void* send, const std::vector<int64_t>& send_counts,
                                void* recv, const std::vector<int64_t>& recv_counts,
                                int64_t row_bytes, const char* what) {
  const double t0 = now();
  comm::alltoallv_rows(comm_, send, send_counts, recv, recv_counts, row_bytes, what);
  const int me = comm_.rank();
  for (int r = 0; r < comm_.size(); ++r) {
    if (r == me) continue;
    stats_.bytes_sent += send_counts[static_cast<size_t>(r)] * row_bytes;
    stats_.bytes_received += recv_counts[static_cast<size_t>(r)] * row_bytes;
  }
  const double dt = now() - t0;
  stats_.exchange_seconds += dt;
  return dt;
}

// q_ = x Wq -> qhat_ (normalised) -> qn_ (gain, bias). Training: global batch statistics.
void PeerLayer::normalise_queries(int64_t T) {
  const int64_t C = H_ * dk_;
  mean_.assign(static_cast<size_t>(C), 0.0);
  rstd_.assign(static_cast<size_t>(C), 1.0);
  View q = q_.view(), qhat = qhat_.view(), qn = qn_.view();
  if (!config_.batch_norm) {
    copy(q, qn);
    return;
  }
  if (training_) {
    std::vector<double> s(static_cast<size_t>(2 * C + 1), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        const double v = q(t, c);
        s[static_cast<size_t>(c)] += v;
        s[static_cast<size_t>(C + c)] += v * v;
      }
    s[static_cast<size_t>(2 * C)] = static_cast<double>(T);
    comm_.allreduce_sum(s.data(), 2 * C + 1, "peer batch norm statistics");
    const double n = s[static_cast<size_t>(2 * C)];
    for (int64_t c = 0; c < C; ++c) {
      const double m = n > 0 ? s[static_cast<size_t>(c)] / n : 0.0;
      const double var = n > 0 ? std::max(0.0, s[static_cast<size_t>(C + c)] / n - m * m) : 1.0;
      mean_[static_cast<size_t>(c)] = m;
      rstd_[static_cast<size_t>(c)] = 1.0 / std::sqrt(var + config_.bn_eps);
      if (n > 0) {
        const double mom = config_.bn_momentum, unbiased = n > 1 ? var * n / (n - 1) : var;
        run_mean_[c] = static_cast<float>((1 - mom) * run_mean_[c] + mom * m);
        run_var_[c] = static_cast<float>((1 - mom) * run_var_[c] + mom * unbiased);
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      mean_[static_cast<size_t>(c)] = run_mean_[c];
      rstd_[static_cast<size_t>(c)] = 1.0 / std::sqrt(double(run_var_[c]) + config_.bn_eps);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      const size_t cc = static_cast<size_t>(c);
      qhat(t, c) = static_cast<float>((q(t, c) - mean_[cc]) * rstd_[cc]);
      qn(t, c) = gain_[c] * qhat(t, c) + bias_[c];
    }
}

// Groups the T S slots into (token, owner) pairs, by owner then token; fills the send side.
void PeerLayer::build_pairs(int64_t T) {
  const int P = comm_.size();
  pairs_to_.assign(static_cast<size_t>(P), 0);
  entries_to_.assign(static_cast<size_t>(P), 0);
  pair_token_.clear();
  entry_slot_.clear();
  send_entries_.clear();
  std::vector<int32_t> owner(static_cast<size_t>(T * S_));
  for (int64_t i = 0; i < T * S_; ++i)
    owner[static_cast<size_t>(i)] =
        placement_.owner(ids_[static_cast<size_t>(i)] / static_cast<int32_t>(n_));
  for (int r = 0; r < P; ++r) {
    const int64_t row0 = int64_t{placement_.local_experts(r).front()} * n_;
    int32_t pair = 0;
    for (int64_t t = 0; t < T; ++t) {
      bool any = false;
      for (int64_t s = 0; s < S_; ++s) {
        const int64_t slot = t * S_ + s;
        if (owner[static_cast<size_t>(slot)] != r) continue;
        any = true;
        entry_slot_.push_back(slot);
        send_entries_.push_back(Entry{pair,
                                      static_cast<int32_t>(ids_[static_cast<size_t>(slot)] - row0),
                                      gate_[static_cast<size_t>(slot)]});
      }
      if (any) {
        pair_token_.push_back(t);
        ++pair;
      }
    }
    pairs_to_[static_cast<size_t>(r)] = pair;
  }
  // Entries per owner, from the slots' owners.
  for (int64_t i = 0; i < static_cast<int64_t>(entry_slot_.size()); ++i)
    ++entries_to_[static_cast<size_t>(
        owner[static_cast<size_t>(entry_slot_[static_cast<size_t>(i)])])];
}

void PeerLayer::forward(ConstView x, View y) {
  const int64_t T = x.rows, C = H_ * dk_, P = comm_.size();
  MOE_CHECK_SHAPE(x, T, d_, (name_ + ".forward x").c_str());
  MOE_CHECK_SHAPE(y, T, d_, (name_ + ".forward y").c_str());
  x_ = x;
  stats_ = PeerStats{};
  const double t_retrieve = now();
  // Queries, retrieval, gates.
  q_.resize({std::max<int64_t>(T, 1), C});
  qhat_.resize({std::max<int64_t>(T, 1), C});
  qn_.resize({std::max<int64_t>(T, 1), C});
  if (T > 0) gemm(Trans::kNo, Trans::kNo, 1.0f, x, wq_.view(), 0.0f, View(q_.data(), T, C));
  normalise_queries(T);
  ids_.resize(static_cast<size_t>(T * S_));
  score_.resize(static_cast<size_t>(T * S_));
  gate_.resize(static_cast<size_t>(T * S_));
  product_key_topk(ConstView(qn_.data(), T * H_, dk_), keys1_.view(), keys2_.view(),
                   static_cast<int>(k_), pk_, ids_.data(), score_.data());
#pragma omp parallel for schedule(static)
  for (int64_t th = 0; th < T * H_; ++th) {
    const float* s = score_.data() + th * k_;
    float* g = gate_.data() + th * k_;
    float m = s[0];  // sorted descending: s[0] is the max
    float z = 0;
    for (int64_t j = 0; j < k_; ++j) z += (g[j] = std::exp(s[j] - m));
    for (int64_t j = 0; j < k_; ++j) g[j] /= z;
  }
  stats_.retrieval_seconds = now() - t_retrieve;

  // Dispatch: per pair the token row and its entries.
  build_pairs(T);
  const int64_t Q = static_cast<int64_t>(pair_token_.size());
  send_rows_.resize({std::max<int64_t>(Q, 1), d_});
  for (int64_t p = 0; p < Q; ++p)
    std::copy_n(x.row(pair_token_[static_cast<size_t>(p)]), d_, send_rows_.data() + p * d_);
  std::vector<int64_t> counts(static_cast<size_t>(2 * P));
  for (int64_t r = 0; r < P; ++r) {
    counts[static_cast<size_t>(2 * r)] = pairs_to_[static_cast<size_t>(r)];
    counts[static_cast<size_t>(2 * r + 1)] = entries_to_[static_cast<size_t>(r)];
  }
  std::vector<int64_t> from = comm::alltoall_counts(comm_, counts, 2, "peer counts");
  pairs_from_.assign(static_cast<size_t>(P), 0);
  entries_from_.assign(static_cast<size_t>(P), 0);
  int64_t R = 0, Er = 0;
  for (int64_t r = 0; r < P; ++r) {
    pairs_from_[static_cast<size_t>(r)] = from[static_cast<size_t>(2 * r)];
    entries_from_[static_cast<size_t>(r)] = from[static_cast<size_t>(2 * r + 1)];
    R += pairs_from_[static_cast<size_t>(r)];
    Er += entries_from_[static_cast<size_t>(r)];
  }
  recv_x_.resize({std::max<int64_t>(R, 1), d_});
  recv_entries_.resize(static_cast<size_t>(Er));
  exchange_rows(send_rows_.data(), pairs_to_, recv_x_.data(), pairs_from_,
                d_ * static_cast<int64_t>(sizeof(float)), "peer dispatch rows");
  exchange_rows(send_entries_.data(), entries_to_, recv_entries_.data(), entries_from_,
                sizeof(Entry), "peer dispatch entries");
  stats_.pairs_sent = Q;
  stats_.entries_sent = static_cast<int64_t>(send_entries_.size());

  // Owner: one output row per received pair.
  entry_pair_.resize(static_cast<size_t>(Er));
  pair_begin_.assign(static_cast<size_t>(R + 1), 0);
  {
    int64_t e = 0, pbase = 0;
    for (int64_t r = 0; r < P; ++r) {
      for (int64_t i = 0; i < entries_from_[static_cast<size_t>(r)]; ++i, ++e) {
        const Entry& en = recv_entries_[static_cast<size_t>(e)];
        MOE_CHECK(en.pair >= 0 && en.pair < pairs_from_[static_cast<size_t>(r)] && en.row >= 0 &&
                      en.row < n_rows_local(),
                  name_, ": bad entry from rank ", r);
        entry_pair_[static_cast<size_t>(e)] = pbase + en.pair;
        ++pair_begin_[static_cast<size_t>(pbase + en.pair + 1)];
        ++hits_[static_cast<size_t>(en.row)];
      }
      pbase += pairs_from_[static_cast<size_t>(r)];
    }
    for (int64_t p = 0; p < R; ++p)
      pair_begin_[static_cast<size_t>(p + 1)] += pair_begin_[static_cast<size_t>(p)];
  }
  owner_forward();

  // Combine: the owners' rows come back per pair; y_t = their sum.
  back_rows_.resize({std::max<int64_t>(Q, 1), d_});
  exchange_rows(out_rows_.data(), pairs_from_, back_rows_.data(), pairs_to_,
                d_ * static_cast<int64_t>(sizeof(float)), "peer combine rows");
  y.fill(0.0f);
  for (int64_t p = 0; p < Q; ++p)
    axpy(1.0f, back_rows_.data() + p * d_, y.row(pair_token_[static_cast<size_t>(p)]), d_);
}

void PeerLayer::owner_forward() {
  const int64_t R = static_cast<int64_t>(pair_begin_.size()) - 1;
  const int64_t Er = static_cast<int64_t>(recv_entries_.size());
  act_.resize(static_cast<size_t>(Er));
  out_rows_.resize({std::max<int64_t>(R, 1), d_});
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t p = 0; p < R; ++p) {
    const float* xp = recv_x_.data() + p * d_;
    float* out = out_rows_.data() + p * d_;
    std::fill_n(out, d_, 0.0f);
    for (int64_t e = pair_begin_[static_cast<size_t>(p)];
         e < pair_begin_[static_cast<size_t>(p + 1)]; ++e) {
      const Entry& en = recv_entries_[static_cast<size_t>(e)];
      const float a = dot(u_.data() + int64_t{en.row} * d_, xp, d_);
      act_[static_cast<size_t>(e)] = a;
      axpy(en.gate * act::gelu(a), v_.data() + int64_t{en.row} * d_, out, d_);
    }
  }
}

void PeerLayer::owner_backward() {
  const int64_t R = static_cast<int64_t>(pair_begin_.size()) - 1;
  const int64_t Er = static_cast<int64_t>(recv_entries_.size());
  dact_.resize(static_cast<size_t>(Er));
  dgate_.resize(static_cast<size_t>(Er));
  // dL/dx per pair (into out_rows_), dL/dgate and dL/da per entry.
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t p = 0; p < R; ++p) {
    const float* dy = recv_dy_.data() + p * d_;
    float* dxp = out_rows_.data() + p * d_;
    std::fill_n(dxp, d_, 0.0f);
    for (int64_t e = pair_begin_[static_cast<size_t>(p)];
         e < pair_begin_[static_cast<size_t>(p + 1)]; ++e) {
      const Entry& en = recv_entries_[static_cast<size_t>(e)];
      const float a = act_[static_cast<size_t>(e)];
      const float dv = dot(dy, v_.data() + int64_t{en.row} * d_, d_);
      dgate_[static_cast<size_t>(e)] = act::gelu(a) * dv;
      const float da = en.gate * act::gelu_grad(a) * dv;
      dact_[static_cast<size_t>(e)] = da;
      axpy(da, u_.data() + int64_t{en.row} * d_, dxp, d_);
    }
  }
  // Row gradients, entries grouped by row (stable: a fixed order for any thread count).
  by_row_.resize(static_cast<size_t>(Er));
  std::iota(by_row_.begin(), by_row_.end(), 0);
  std::stable_sort(by_row_.begin(), by_row_.end(), [&](int64_t a, int64_t b) {
    return recv_entries_[static_cast<size_t>(a)].row < recv_entries_[static_cast<size_t>(b)].row;
  });
  std::vector<int64_t> group;  // starts of runs of one row in by_row_
  for (int64_t i = 0; i < Er; ++i)
    if (i == 0 || recv_entries_[static_cast<size_t>(by_row_[static_cast<size_t>(i)])].row !=
                      recv_entries_[static_cast<size_t>(by_row_[static_cast<size_t>(i - 1)])].row)
      group.push_back(i);
  group.push_back(Er);
  const int64_t G = static_cast<int64_t>(group.size()) - 1;
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t row =
        recv_entries_[static_cast<size_t>(
                          by_row_[static_cast<size_t>(group[static_cast<size_t>(gi)])])]
            .row;
    float* du = du_.data() + row * d_;
    float* dv = dv_.data() + row * d_;
    for (int64_t i = group[static_cast<size_t>(gi)]; i < group[static_cast<size_t>(gi + 1)]; ++i) {
      const int64_t e = by_row_[static_cast<size_t>(i)];
      const int64_t p = entry_pair_[static_cast<size_t>(e)];
      const Entry& en = recv_entries_[static_cast<size_t>(e)];
      axpy(dact_[static_cast<size_t>(e)], recv_x_.data() + p * d_, du, d_);
      axpy(en.gate * act::gelu(act_[static_cast<size_t>(e)]), recv_dy_.data() + p * d_, dv, d_);
    }
  }
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t row =
        recv_entries_[static_cast<size_t>(
                          by_row_[static_cast<size_t>(group[static_cast<size_t>(gi)])])]
            .row;
    if (!is_touched_[static_cast<size_t>(row)]) {
      is_touched_[static_cast<size_t>(row)] = 1;
      touched_.push_back(row);
    }
  }
}

// dqn_ -> dq (into dqn_), gain/bias gradients; training-mode batch norm over the global batch.
void PeerLayer::normalise_backward(int64_t T) {
  const int64_t C = H_ * dk_;
  if (!config_.batch_norm) return;
  View dqn = dqn_.view();
  ConstView qhat = qhat_.view();
  std::vector<double> s(static_cast<size_t>(2 * C + 1), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      const double g = dqn(t, c);
      dbias_[c] += static_cast<float>(g);
      dgain_[c] += static_cast<float>(g * qhat(t, c));
      const double gh = g * gain_[c];  // dL/dqhat
      s[static_cast<size_t>(c)] += gh;
      s[static_cast<size_t>(C + c)] += gh * qhat(t, c);
    }
  s[static_cast<size_t>(2 * C)] = static_cast<double>(T);
  comm_.allreduce_sum(s.data(), 2 * C + 1, "peer batch norm backward");
  const double n = s[static_cast<size_t>(2 * C)];
  if (n <= 0) return;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      const size_t cc = static_cast<size_t>(c);
      const double gh = double(dqn(t, c)) * gain_[c];
      dqn(t, c) = static_cast<float>(rstd_[cc] * (gh - s[cc] / n - qhat(t, c) * s[C + cc] / n));
    }
}

void PeerLayer::backward(ConstView dy, View dx) {
  const int64_t T = x_.rows, C = H_ * dk_, h = dk_ / 2;
  MOE_CHECK_SHAPE(dy, T, d_, (name_ + ".backward dy").c_str());
  MOE_CHECK_SHAPE(dx, T, d_, (name_ + ".backward dx").c_str());
  MOE_CHECK(training_, name_, ": backward in inference mode");
  // Output gradients out per pair (the forward's pairs), owners' results back.
  const int64_t Q = static_cast<int64_t>(pair_token_.size());
  for (int64_t p = 0; p < Q; ++p)
    std::copy_n(dy.row(pair_token_[static_cast<size_t>(p)]), d_, send_rows_.data() + p * d_);
  const int64_t R = static_cast<int64_t>(pair_begin_.size()) - 1;
  recv_dy_.resize({std::max<int64_t>(R, 1), d_});
  exchange_rows(send_rows_.data(), pairs_to_, recv_dy_.data(), pairs_from_,
                d_ * static_cast<int64_t>(sizeof(float)), "peer backward dy");
  owner_backward();
  exchange_rows(out_rows_.data(), pairs_from_, back_rows_.data(), pairs_to_,
                d_ * static_cast<int64_t>(sizeof(float)), "peer backward dx");
  back_dgate_.resize(std::max<size_t>(send_entries_.size(), 1));
  exchange_rows(dgate_.data(), entries_from_, back_dgate_.data(), entries_to_, sizeof(float),
                "peer backward dgate");
  dx.fill(0.0f);
  for (int64_t p = 0; p < Q; ++p)
    axpy(1.0f, back_rows_.data() + p * d_, dx.row(pair_token_[static_cast<size_t>(p)]), d_);

  // Gates: softmax backward per (token, head) -> dL/dscore.
  dscore_.assign(static_cast<size_t>(T * S_), 0.0f);
  for (size_t e = 0; e < entry_slot_.size(); ++e)
    dscore_[static_cast<size_t>(entry_slot_[e])] = back_dgate_[e];
#pragma omp parallel for schedule(static)
  for (int64_t th = 0; th < T * H_; ++th) {
    float* ds = dscore_.data() + th * k_;
    const float* g = gate_.data() + th * k_;
    float sum = 0;
    for (int64_t j = 0; j < k_; ++j) sum += g[j] * ds[j];
    for (int64_t j = 0; j < k_; ++j) ds[j] = g[j] * (ds[j] - sum);
  }
  // Scores s = qn1 . c1_i + qn2 . c2_j -> dqn, dkeys.
  dqn_.resize({std::max<int64_t>(T, 1), C});
  View dqn(dqn_.data(), T, C);
  if (T > 0) dqn.fill(0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t th = 0; th < T * H_; ++th) {
    float* dq = dqn_.data() + th * dk_;
    for (int64_t j = 0; j < k_; ++j) {
      const int64_t id = ids_[static_cast<size_t>(th * k_ + j)];
      const float ds = dscore_[static_cast<size_t>(th * k_ + j)];
      axpy(ds, keys1_.data() + (id / n_) * h, dq, h);
      axpy(ds, keys2_.data() + (id % n_) * h, dq + h, h);
    }
  }
  for (int64_t th = 0; th < T * H_; ++th) {
    const float* qn = qn_.data() + th * dk_;
    for (int64_t j = 0; j < k_; ++j) {
      const int64_t id = ids_[static_cast<size_t>(th * k_ + j)];
      const float ds = dscore_[static_cast<size_t>(th * k_ + j)];
      axpy(ds, qn, dkeys1_.data() + (id / n_) * h, h);
      axpy(ds, qn + h, dkeys2_.data() + (id % n_) * h, h);
    }
  }
  // Batch norm, then the query networks.
  normalise_backward(T);
  if (T > 0) {
    gemm(Trans::kYes, Trans::kNo, 1.0f, x_, dqn, 1.0f, dwq_.view());
    gemm(Trans::kNo, Trans::kYes, 1.0f, dqn, wq_.view(), 1.0f, dx);
  }
}

PeerUsage PeerLayer::usage(bool reset) {
  double s[3] = {0, 0, 0};  // experts hit, sum c log c, sum c
  for (int64_t c : hits_) {
    if (c == 0) continue;
    s[0] += 1;
    s[1] += double(c) * std::log(double(c));
    s[2] += double(c);
  }
  comm_.allreduce_sum(s, 3, "peer usage");
  PeerUsage u;
  const double N = static_cast<double>(config_.n_experts());
  u.usage = s[0] / N;
  u.retrievals = static_cast<int64_t>(s[2]);
  // KL(z || 1/N) = sum z log(z N) = log N + (sum c log c) / C - log C.
  u.kl_uniform = s[2] > 0 ? std::log(N) + s[1] / s[2] - std::log(s[2]) : 0.0;
  if (reset) std::fill(hits_.begin(), hits_.end(), 0);
  return u;
}

}  // namespace moe::model
