#include "model/layers/moe_layer.hpp"

#include <chrono>

#include "model/buffers.hpp"
#include "model/routers/expert_choice.hpp"
#include "model/routers/topk.hpp"

namespace moe::model {

namespace {

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::unique_ptr<Router> make_router(const MoeConfig& c, int64_t d_model,
                                    const comm::Communicator& comm, uint64_t seed) {
  if (c.router == RouterKind::kExpertChoice) {
    ExpertChoiceOptions o;
    o.n_experts = c.n_experts;
    o.capacity = c.capacity_factor > 0.0 ? c.capacity_factor : static_cast<double>(c.top_k);
    return std::make_unique<ExpertChoiceRouter>(d_model, o, &comm, seed);
  }
  TopKOptions o{c.n_experts,     c.top_k,       c.renormalize,
                c.aux_loss_coef, c.z_loss_coef, c.global_balance};
  o.bias_balance = c.router == RouterKind::kTopKBias;
  o.bias_update_rate = c.bias_update_rate;
  o.skew = c.router_skew;
  return std::make_unique<TopKRouter>(d_model, o, &comm, seed);
}

}  // namespace

ExchangeMode parse_exchange_mode(const std::string& name) {
  if (name == "auto") return ExchangeMode::kAuto;
  if (name == "alltoallv") return ExchangeMode::kAlltoallv;
  if (name == "shared") return ExchangeMode::kShared;
  if (name == "hierarchical") return ExchangeMode::kHierarchical;
  throw Error(ErrorKind::kConfig, cat("comm.exchange = '", name,
                                      "' is not one of auto | alltoallv | shared | hierarchical"));
}

const char* exchange_mode_name(ExchangeMode m) {
  switch (m) {
    case ExchangeMode::kAuto:
      return "auto";
    case ExchangeMode::kAlltoallv:
      return "alltoallv";
    case ExchangeMode::kShared:
      return "shared";
    case ExchangeMode::kHierarchical:
      return "hierarchical";
  }
  return "?";
}

RouterKind parse_router_kind(const std::string& name) {
  if (name == "topk") return RouterKind::kTopK;
  if (name == "topk_bias") return RouterKind::kTopKBias;
  if (name == "expert_choice") return RouterKind::kExpertChoice;
  if (name == "single_gate") return RouterKind::kSingleGate;
  throw Error(ErrorKind::kConfig,
              cat("model.moe.router = '", name,
                  "' is not one of topk | topk_bias | expert_choice | single_gate"));
}

const char* router_kind_name(RouterKind r) {
  switch (r) {
    case RouterKind::kTopK:
      return "topk";
    case RouterKind::kTopKBias:
      return "topk_bias";
    case RouterKind::kExpertChoice:
      return "expert_choice";
    case RouterKind::kSingleGate:
      return "single_gate";
  }
  return "?";
}

MoeConfig MoeConfig::from(const Config& config) {
  MoeConfig c;
  c.n_experts = static_cast<int>(config.get_int("model.moe.num_experts"));
  c.top_k = static_cast<int>(config.get_int("model.moe.top_k"));
  c.d_ff = config.get_int("model.moe.d_ff");
  c.activation = parse_activation(config.get_string("model.moe.activation"));
  c.renormalize = config.get_bool("model.moe.renormalize");
  c.aux_loss_coef = config.get_float("model.moe.aux_loss_coef");
  c.z_loss_coef = config.get_float("model.moe.z_loss_coef");
  c.global_balance = config.get_string("model.moe.aux_loss_scope") == "global";
  c.capacity_factor = config.get_float("model.moe.capacity_factor");
  c.pipeline_chunks = static_cast<int>(config.get_int("model.moe.pipeline_chunks"));
  c.exchange = parse_exchange_mode(config.get_string("comm.exchange"));
  c.ranks_per_node = static_cast<int>(config.get_int("comm.ranks_per_node"));
  c.router = parse_router_kind(config.get_string("model.moe.router"));
  c.bias_update_rate = config.get_float("model.moe.bias_update_rate");
  c.shared_experts = static_cast<int>(config.get_int("model.moe.shared_experts"));
  c.router_skew = config.get_float("bench.router_skew");
  if (c.top_k > c.n_experts)
    throw Error(ErrorKind::kConfig, cat("model.moe.top_k = ", c.top_k,
                                        " exceeds model.moe.num_experts = ", c.n_experts));
  return c;
}

MoeLayer::MoeLayer(std::string name, int64_t d_model, const MoeConfig& config,
                   const comm::ExpertPlacement& placement, const comm::Communicator& comm,
                   uint64_t seed)
    : name_(std::move(name)),
      d_(d_model),
      config_(config),
      placement_(placement),
      comm_(comm),
      router_(make_router(config, d_model, comm, seed)),
      own_experts_(std::make_unique<ExpertBank>(d_model, config.d_ff, config.activation,
                                                placement.local_experts(comm.rank()), seed)),
      experts_(own_experts_.get()),
      ex_dispatch_(comm, name_ + ".dispatch",
                   {comm::ExchangeAlgorithm::kFlat, config.ranks_per_node}),
      ex_combine_(comm, name_ + ".combine",
                  {comm::ExchangeAlgorithm::kFlat, config.ranks_per_node}) {
  if (placement.n_experts() != config.n_experts || placement.n_ranks() != comm.size())
    throw Error(
        ErrorKind::kConfig,
        cat(name_, ": placement has ", placement.n_experts(), " experts over ", placement.n_ranks(),
            " ranks; the layer has ", config.n_experts, " experts over ", comm.size(), " ranks"));
  if (config.shared_experts > 0)
    shared_ffn_ = std::make_unique<Ffn>(
        name_ + ".shared", d_model, config.d_ff * config.shared_experts, config.activation, seed);
  if (config.pipeline_chunks < 1)
    throw Error(ErrorKind::kConfig, cat(name_, ": pipeline_chunks ", config.pipeline_chunks));
  const std::string rpn = comm::check_ranks_per_node(config.ranks_per_node, comm.size());
  if (!rpn.empty()) throw Error(ErrorKind::kConfig, rpn);
  // The shared and hierarchical paths have no non-blocking form: a pipelined layer uses MPI.
  const ExchangeMode want = config.exchange;
  if ((want == ExchangeMode::kShared || want == ExchangeMode::kHierarchical) &&
      config.pipeline_chunks > 1)
    throw Error(ErrorKind::kConfig,
                cat("comm.exchange = ", exchange_mode_name(want),
                    " has no pipelined form, but model.moe.pipeline_chunks = ",
                    config.pipeline_chunks, "; set comm.exchange to auto or alltoallv"));
  if (want != ExchangeMode::kAlltoallv && config.pipeline_chunks == 1) {
    // Collective on first use (each splits off node communicators): call all on every rank.
    const bool a = ex_dispatch_.shared_available();
    const bool b = ex_combine_.shared_available();
    const comm::NodeLayout& nodes = ex_dispatch_.nodes();
    shared_ = a && b && want != ExchangeMode::kHierarchical;
    if (want == ExchangeMode::kShared && !shared_)
      throw Error(
          ErrorKind::kConfig,
          cat("comm.exchange = shared needs every rank on one node, but the ", comm.size(),
              " ranks are on ", nodes.describe(), "; set comm.exchange to auto or alltoallv"));
    if (want == ExchangeMode::kHierarchical && !nodes.uniform())
      throw Error(ErrorKind::kConfig,
                  cat("comm.exchange = hierarchical needs the same number of ranks on every node, "
                      "but the ",
                      comm.size(), " ranks are on ", nodes.describe(),
                      "; set comm.exchange to auto or alltoallv, or set comm.ranks_per_node"));
    const bool hier =
        want == ExchangeMode::kHierarchical ||
        (!shared_ && nodes.uniform() && nodes.n_nodes > 1 && nodes.ranks_per_node > 1);
    mode_ = shared_ ? ExchangeMode::kShared : hier ? ExchangeMode::kHierarchical : mode_;
  }
  if (mode_ == ExchangeMode::kHierarchical) {
    ex_dispatch_.set_algorithm(comm::ExchangeAlgorithm::kHierarchical);
    ex_combine_.set_algorithm(comm::ExchangeAlgorithm::kHierarchical);
  }
}

MoeLayer::MoeLayer(std::string name, int64_t d_model, const MoeConfig& config,
                   const comm::ExpertPlacement& placement, const comm::Communicator& comm,
                   uint64_t seed, ExpertBank& shared_bank)
    : MoeLayer(std::move(name), d_model, config, placement, comm, seed) {
  if (shared_bank.d_model() != d_model || shared_bank.d_ff() != config.d_ff ||
      shared_bank.activation() != config.activation ||
      shared_bank.global_ids() != placement.local_experts(comm.rank()))
    throw Error(ErrorKind::kConfig, cat(name_,
                                        ": the shared expert bank does not match the layer "
                                        "(width, activation or expert placement)"));
  own_experts_.reset();
  experts_ = &shared_bank;
}

std::vector<ParamRef> MoeLayer::replicated_params() {
  std::vector<ParamRef> out = router_->params();
  if (shared_ffn_)
    for (ParamRef p : shared_ffn_->params()) {
      p.name =
          "shared." + p.name.substr(p.name.rfind('.') + 1);  // "<name>.shared.w1" -> "shared.w1"
      out.push_back(std::move(p));
    }
  return out;
}

std::vector<ParamRef> MoeLayer::params() {
  std::vector<ParamRef> out = replicated_params();
  if (own_experts_)
    for (ParamRef& p : experts_->params()) out.push_back(std::move(p));
  for (ParamRef& p : out) p.name = name_ + "." + p.name;
  return out;
}

void MoeLayer::replace_experts(const comm::ExpertPlacement& next,
                               std::unique_ptr<ExpertBank> bank) {
  MOE_CHECK(own_experts_ != nullptr, name_, ": cannot re-place a borrowed expert bank");
  MOE_CHECK(next.n_experts() == config_.n_experts && next.n_ranks() == comm_.size() && bank &&
                bank->global_ids() == next.local_experts(comm_.rank()),
            name_, ": the new expert bank does not match the new placement");
  if (next.has_replicas() && (config_.pipeline_chunks > 1 || config_.capacity_factor > 0.0))
    throw Error(ErrorKind::kConfig,
                cat(name_,
                    ": expert replicas need model.moe.pipeline_chunks 1 and dropless "
                    "routing (capacity_factor 0)"));
  placement_ = next;
  own_experts_ = std::move(bank);
  experts_ = own_experts_.get();
  chunks_.clear();  // their caches point into the old bank's forward
}

void MoeLayer::zero_grad() {
  for (ParamRef& p : router_->params()) p.grad.fill(0.0f);
  if (shared_ffn_) shared_ffn_->zero_grad();
  if (own_experts_) experts_->zero_grad();
}

void MoeLayer::combine_weighted(View y) const {
  moe::model::combine_weighted(ConstView(slot_out_.data(), y.rows * route_.k, d_),
                               route_.weight.data(), plan_.kept(), route_.k, y);
}

void combine_weighted(ConstView slot_out, const float* w, const std::vector<uint8_t>& kept, int k,
                      View y) {
  const int64_t T = y.rows, d = y.cols;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* yr = y.row(t);
    for (int64_t c = 0; c < d; ++c) yr[c] = 0.0f;
    for (int j = 0; j < k; ++j) {
      if (!kept[t * k + j]) continue;
      const float wj = w[t * k + j];
      const float* s = slot_out.row(t * k + j);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) yr[c] += wj * s[c];
    }
  }
}

void MoeLayer::forward(ConstView x, View y) {
  run_forward(x, y, /*inference=*/false);
}

void MoeLayer::infer(ConstView x, View y) {
  run_forward(x, y, /*inference=*/true);
}

void MoeLayer::pack_for_inference(WeightType weights) {
  experts_->pack_for_inference(weights);
}

void MoeLayer::run_experts(ConstView xin, View yout, bool inference) {
  if (inference && experts_->packed_for_inference())
    experts_->infer(xin, plan_.recv_offsets(), yout);
  else
    experts_->forward(xin, plan_.recv_offsets(), yout, chunks_[0].cache);
}

void MoeLayer::run_forward(ConstView x, View y, bool inference) {
  const int64_t T = x.rows, d = d_;
  const int C = inference ? 1 : config_.pipeline_chunks;
  MOE_CHECK_SHAPE(x, T, d, cat(name_, ".forward x"));
  MOE_CHECK_SHAPE(y, T, d, cat(name_, ".forward y"));
  x_ = x;
  const comm::ExchangeStats s0 = ex_dispatch_.stats(), s1 = ex_combine_.stats();
  double expert_s = 0.0;

  // route (inference: no statistics all-reduce, nothing kept for a backward)
  if (inference)
    router_->infer(x, route_);
  else
    router_->forward(x, route_);
  const int k = route_.k;
  // plan: the whole batch (drops, statistics); with chunks, one dropless plan per chunk over
  // the slots the whole-batch plan kept. Expert choice already applied its capacity.
  const double capacity =
      config_.router == RouterKind::kExpertChoice ? 0.0 : config_.capacity_factor;
  plan_ =
      comm::DispatchPlan::build(route_.routing(), placement_, comm::PlanOptions{capacity}, comm_);
  chunks_.resize(static_cast<size_t>(C));
  int64_t R = 0;
  for (int c = 0; c < C; ++c) {
    Chunk& ch = chunks_[c];
    ch.t0 = T * c / C;
    ch.nt = T * (c + 1) / C - ch.t0;
    ch.r0 = R;
    if (C > 1) {
      ch.expert.resize(static_cast<size_t>(ch.nt * k));
      for (int64_t s = 0; s < ch.nt * k; ++s)
        ch.expert[s] = plan_.kept()[ch.t0 * k + s] ? route_.expert[ch.t0 * k + s] : -1;
      comm::RoutingView rv{ch.nt, k, ch.expert.data(), route_.weight.data() + ch.t0 * k};
      ch.plan = comm::DispatchPlan::build(rv, placement_, comm::PlanOptions{}, comm_);
      R += ch.plan.n_recv();
    } else {
      R += plan_.n_recv();
    }
  }
  View slot_out = scratch(slot_out_, T * k, d);

  if (shared_) {
    // Single copy: the experts read ex_dispatch_'s input window (it stays valid, as their
    // backward cache, until the next forward's dispatch_shared) and write its output window.
    ConstView xin = ex_dispatch_.dispatch_shared(plan_, x);  // dispatch
    View yout = ex_dispatch_.combine_buffer(plan_, d);
    double t0 = seconds_now();
    run_experts(xin, yout, inference);  // experts
    expert_s += seconds_now() - t0;
    // No backward reads xin: the next dispatch_shared need not wait for this rank.
    if (inference) ex_dispatch_.input_consumed();
    ex_dispatch_.combine_shared(plan_, slot_out);  // combine
    combine_weighted(y);
    shared_forward(x, y);
    record_forward_stats(s0, s1, expert_s);
    return;
  }
  View xin = scratch(xin_, R, d), yout = scratch(yout_, R, d);
  if (C == 1) {
    ex_dispatch_.dispatch(plan_, x, xin);  // dispatch
    double t0 = seconds_now();
    run_experts(xin, yout, inference);  // experts
    expert_s += seconds_now() - t0;
    ex_combine_.combine(plan_, yout, slot_out);  // combine
  } else {
    // Pipeline: dispatch c+1 and combine c-1 are in flight while chunk c's experts run.
    auto rows = [&](View v, const Chunk& ch) { return v.row_range(ch.r0, ch.plan.n_recv()); };
    ex_dispatch_.dispatch_start(chunks_[0].plan, x.row_range(chunks_[0].t0, chunks_[0].nt));
    for (int c = 0; c < C; ++c) {
      Chunk& ch = chunks_[c];
      ex_dispatch_.dispatch_wait(ch.plan, rows(xin, ch));
      if (c + 1 < C) {
        const Chunk& nx = chunks_[c + 1];
        ex_dispatch_.dispatch_start(nx.plan, x.row_range(nx.t0, nx.nt));
      }
      double t0 = seconds_now();
      experts_->forward(rows(xin, ch), ch.plan.recv_offsets(), rows(yout, ch), ch.cache);
      expert_s += seconds_now() - t0;
      if (c > 0) {
        const Chunk& pv = chunks_[c - 1];
        ex_combine_.combine_wait(pv.plan, slot_out.row_range(pv.t0 * k, pv.nt * k));
      }
      ex_combine_.combine_start(ch.plan, rows(yout, ch));
    }
    const Chunk& last = chunks_[C - 1];
    ex_combine_.combine_wait(last.plan, slot_out.row_range(last.t0 * k, last.nt * k));
  }
  combine_weighted(y);
  shared_forward(x, y);
  record_forward_stats(s0, s1, expert_s);
}

void MoeLayer::shared_forward(ConstView x, View y) {
  if (!shared_ffn_) return;
  View s = scratch(shared_buf_, x.rows, d_);
  shared_ffn_->forward(x, s);
  add_into(y, s);
}

void MoeLayer::record_forward_stats(const comm::ExchangeStats& s0, const comm::ExchangeStats& s1,
                                    double expert_s) {
  stats_ = MoeLoadStats{};
  stats_.load = plan_.stats();
  stats_.load_balance_loss = route_.load_balance_loss;
  stats_.z_loss = route_.z_loss;
  stats_.aux_loss = route_.aux_loss;
  stats_.prob_sum = route_.prob_sum;
  stats_.bytes_sent = ex_dispatch_.stats().bytes_sent - s0.bytes_sent +
                      ex_combine_.stats().bytes_sent - s1.bytes_sent;
  stats_.bytes_received = ex_dispatch_.stats().bytes_received - s0.bytes_received +
                          ex_combine_.stats().bytes_received - s1.bytes_received;
  stats_.exchange_seconds =
      ex_dispatch_.stats().seconds - s0.seconds + ex_combine_.stats().seconds - s1.seconds;
  stats_.expert_seconds = expert_s;
}

void combine_transpose(ConstView dy, ConstView slot_out, const float* w,
                       const std::vector<uint8_t>& kept, int k, View dweight, View ds) {
  const int64_t T = dy.rows, d = dy.cols;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* g = dy.row(t);
    for (int j = 0; j < k; ++j) {
      const int64_t s = t * k + j;
      float* out = ds.row(s);
      if (!kept[s]) {
        dweight(t, j) = 0.0f;
        for (int64_t c = 0; c < d; ++c) out[c] = 0.0f;
        continue;
      }
      const float* so = slot_out.row(s);
      const float wj = w[s];
      double dot = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        dot += double(g[c]) * so[c];
        out[c] = wj * g[c];
      }
      dweight(t, j) = static_cast<float>(dot);
    }
  }
}

void MoeLayer::backward(ConstView dy, View dx, float aux_scale) {
  const int64_t T = x_.rows, d = d_;
  const int k = route_.k, C = config_.pipeline_chunks;
  MOE_CHECK_SHAPE(dy, T, d, cat(name_, ".backward dy"));
  MOE_CHECK_SHAPE(dx, T, d, cat(name_, ".backward dx"));
  const comm::ExchangeStats s0 = ex_dispatch_.stats(), s1 = ex_combine_.stats();
  double expert_s = 0.0;
  const std::vector<uint8_t>& kept = plan_.kept();
  const float* w = route_.weight.data();

  // combine^T, local part: dweight_tj = <dy_t, slot_out_tj>, ds_tj = w_tj dy_t.
  View dweight = scratch(dweight_, T, k);
  View ds = scratch(slot_grad_, T * k, d);
  ConstView slot_out(slot_out_.data(), T * k, d);
  combine_transpose(dy, slot_out, w, kept, k, dweight, ds);

  View dslot = ds;  // each chunk's ds rows are sent before its dslot rows arrive
  int64_t R = 0;
  for (const Chunk& ch : chunks_) R += C == 1 ? plan_.n_recv() : ch.plan.n_recv();

  if (shared_) {
    // Single copy through ex_combine_'s windows: ex_dispatch_'s input window still holds the
    // forward's xin, which the experts' backward reads (cache.x). dyin, dxin and xin are three
    // different windows, so nothing aliases; ds is consumed by dispatch_slots_shared before
    // combine_shared writes dslot over it.
    ConstView dyin = ex_combine_.dispatch_slots_shared(plan_, ds);  // combine^T
    View dxin = ex_combine_.combine_buffer(plan_, d);
    double t0 = seconds_now();
    experts_->backward(dyin, dxin, chunks_[0].cache);  // experts^T
    expert_s += seconds_now() - t0;
    ex_combine_.combine_shared(plan_, dslot);  // dispatch^T
  } else if (C == 1) {
    View dyin(yout_.data(), R, d);  // the forward's expert outputs are no longer needed
    View xin(xin_.data(), R, d);    // expert backward writes dL/dxin over its input
    ex_dispatch_.dispatch_slots(plan_, ds, dyin);  // combine^T
    double t0 = seconds_now();
    experts_->backward(dyin, xin, chunks_[0].cache);  // experts^T
    expert_s += seconds_now() - t0;
    ex_combine_.combine(plan_, xin, dslot);  // dispatch^T
  } else {
    View dyin(yout_.data(), R, d);
    View xin(xin_.data(), R, d);
    // The exchange has no non-blocking dispatch_slots; a plan with one slot per "token" over
    // the T*k slot rows moves the same rows in the same order (slots sorted by (rank, expert,
    // t*k + j) = (rank, expert, t, j)), so dispatch_start on it is dispatch_slots.
    for (Chunk& ch : chunks_) {
      comm::RoutingView rv{ch.nt * k, 1, ch.expert.data(), w + ch.t0 * k};
      ch.slot_plan = comm::DispatchPlan::build(rv, placement_, comm::PlanOptions{}, comm_);
      MOE_CHECK_EQ(ch.slot_plan.n_recv(), ch.plan.n_recv(), name_, " slot plan");
    }
    auto rows = [&](View v, const Chunk& ch) { return v.row_range(ch.r0, ch.plan.n_recv()); };
    auto slots = [&](View v, const Chunk& ch) { return v.row_range(ch.t0 * k, ch.nt * k); };
    ex_dispatch_.dispatch_start(chunks_[0].slot_plan, slots(ds, chunks_[0]));
    for (int c = 0; c < C; ++c) {
      Chunk& ch = chunks_[c];
      ex_dispatch_.dispatch_wait(ch.slot_plan, rows(dyin, ch));
      if (c + 1 < C)
        ex_dispatch_.dispatch_start(chunks_[c + 1].slot_plan, slots(ds, chunks_[c + 1]));
      double t0 = seconds_now();
      experts_->backward(rows(dyin, ch), rows(xin, ch), ch.cache);
      expert_s += seconds_now() - t0;
      if (c > 0) ex_combine_.combine_wait(chunks_[c - 1].slot_plan, slots(dslot, chunks_[c - 1]));
      ex_combine_.combine_start(ch.slot_plan, rows(xin, ch));
    }
    ex_combine_.combine_wait(chunks_[C - 1].slot_plan, slots(dslot, chunks_[C - 1]));
  }

  // dispatch^T, local part: dx_t = sum_j dslot_tj.
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* o = dx.row(t);
    for (int64_t c = 0; c < d; ++c) o[c] = 0.0f;
    for (int j = 0; j < k; ++j) {
      if (!kept[t * k + j]) continue;
      const float* s = dslot.row(t * k + j);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] += s[c];
    }
  }
  router_->backward(dweight, aux_scale, dx);  // route^T: dx += ..., dW_r
  if (shared_ffn_) {                          // shared experts^T: dx += their dL/dx
    View g = scratch(shared_buf_, T, d);
    shared_ffn_->backward(dy, g);
    add_into(dx, g);
  }

  stats_.bytes_sent += ex_dispatch_.stats().bytes_sent - s0.bytes_sent +
                       ex_combine_.stats().bytes_sent - s1.bytes_sent;
  stats_.bytes_received += ex_dispatch_.stats().bytes_received - s0.bytes_received +
                           ex_combine_.stats().bytes_received - s1.bytes_received;
  stats_.exchange_seconds +=
      ex_dispatch_.stats().seconds - s0.seconds + ex_combine_.stats().seconds - s1.seconds;
  stats_.expert_seconds += expert_s;
}

}  // namespace moe::model
