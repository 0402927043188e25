#include "model/serve/engine.hpp"

#include <algorithm>
#include <chrono>

#include "runtime/error.hpp"

namespace moe::model::serve {

namespace {

enum StepKind : int64_t { kStop = 0, kStep = 1 };

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// The end of the text to show: before the first stop string, or, while none has matched,
// before any tail that could still grow into one. Sets *stopped when a stop string matched.
size_t visible_end(const std::string& text, const std::vector<std::string>& stop, bool* stopped) {
  size_t first = std::string::npos;
  for (const auto& s : stop)
    if (!s.empty()) first = std::min(first, text.find(s));
  *stopped = first != std::string::npos;
  if (*stopped) return first;
  size_t hold = 0;
  for (const auto& s : stop)
    for (size_t n = std::min(s.size() - 1, text.size()); n > hold; --n)
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  return text.size() - hold;
}

}  // namespace

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::kLength:
      return "length";
    case Finish::kStop:
      return "stop";
    case Finish::kCancelled:
      return "cancelled";
    case Finish::kNone:
      break;
  }
  return "none";
}

Engine::Engine(Transformer& model, const comm::Communicator& comm, const EngineOptions& options,
               std::function<std::string(const std::vector<int32_t>&)> decode)
    : model_(model), comm_(comm), options_(options), decode_(std::move(decode)) {
  MOE_CHECK(options_.max_batch >= 1 && options_.max_context >= 2, "engine: max_batch ",
            options_.max_batch, ", max_context ", options_.max_context);
  model_.pack_for_inference(options_.weights);
  const int P = comm_.size();
  const int per_rank = options_.spread ? (options_.max_batch + P - 1) / P : options_.max_batch;
  const int mine = options_.spread || comm_.rank() == 0 ? per_rank : 0;
  caches_.reserve(static_cast<size_t>(mine));
  for (int i = 0; i < mine; ++i) caches_.push_back(model_.new_cache(options_.max_context));
  if (comm_.rank() != 0) return;
  free_.resize(static_cast<size_t>(P));
  for (int r = 0; r < (options_.spread ? P : 1); ++r)
    for (int i = per_rank - 1; i >= 0; --i) free_[static_cast<size_t>(r)].push_back(i);
  for (int l = 0; l < model_.config().n_layers; ++l)
    if (model_.config().is_moe(l)) {
      stats_.expert_load_blocks.push_back(l);
      stats_.expert_load.emplace_back(static_cast<size_t>(model_.config().experts(l)), 0);
    }
  active_.reserve(static_cast<size_t>(options_.max_batch));
}

bool Engine::submit(std::shared_ptr<Request> request) {
  MOE_CHECK(!request->prompt.empty() && request->max_tokens >= 1 &&
                static_cast<int64_t>(request->prompt.size()) + request->max_tokens <=
                    options_.max_context,
            "engine.submit: prompt of ", request->prompt.size(), " tokens + max_tokens ",
            request->max_tokens, " exceeds the context of ", options_.max_context);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!accepting_.load() || static_cast<int64_t>(queue_.size()) >= options_.max_queue)
      return false;
    queue_.push_back(std::move(request));
    ++stats_.requests;
    stats_.queue_length = static_cast<int64_t>(queue_.size());
  }
  cv_.notify_one();
  return true;
}

void Engine::shutdown() {
  accepting_.store(false);
  cv_.notify_one();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Engine::run(const std::function<bool()>& should_stop) {
  if (comm_.rank() == 0)
    run_root(should_stop);
  else
    run_follower();
}

void Engine::run_follower() {
  for (;;) {
    int64_t desc[3] = {kStop, 0, 0};
    comm_.broadcast(desc, 3, 0, "serve step descriptor");
    if (desc[0] == kStop) return;
    step(desc[1], desc[2]);
  }
}

ConstView Engine::step(int64_t n_seq, int64_t n_ids) {
  payload_.resize(static_cast<size_t>(n_seq * kMeta + n_ids));
  comm_.broadcast(payload_.data(), static_cast<int64_t>(payload_.size()), 0, "serve step");
  const int rank = comm_.rank(), P = comm_.size();
  // This rank's sequences, in step order; their tokens sit in the payload back to back.
  local_ids_.clear();
  local_n_.clear();
  local_caches_.clear();
  rows_.assign(static_cast<size_t>(P), 0);
  const int64_t* ids = payload_.data() + n_seq * kMeta;
  for (int64_t i = 0; i < n_seq; ++i) {
    const int64_t* m = payload_.data() + i * kMeta;  // owner, cache, n_new, fresh
    const int64_t n = m[2];
    if (m[0] == rank) {
      SequenceCache& c = caches_[static_cast<size_t>(m[1])];
      if (m[3] != 0) c.clear();
      for (int64_t t = 0; t < n; ++t) local_ids_.push_back(static_cast<int32_t>(ids[t]));
      local_n_.push_back(n);
      local_caches_.push_back(&c);
    }
    ++rows_[static_cast<size_t>(m[0])];
    ids += n;
  }
  ConstView logits = model_.extend(local_ids_, local_n_, local_caches_);
  if (rows_[0] == n_seq) return logits;  // all on rank 0: nothing to gather
  const int64_t V = model_.config().vocab_size;
  MOE_CHECK(logits.contiguous(), "engine: logits rows are not contiguous");
  std::vector<int64_t> counts(static_cast<size_t>(P));
  for (int r = 0; r < P; ++r) counts[static_cast<size_t>(r)] = rows_[static_cast<size_t>(r)] * V;
  if (rank == 0) gathered_.resize(static_cast<size_t>(n_seq * V));
  comm_.gatherv(logits.data, logits.rows * V, gathered_.data(), counts, 0, "serve logits");
  return ConstView(gathered_.data(), n_seq, V);
}

void Engine::finish(Slot& slot, Finish why) {
  {
    std::lock_guard<std::mutex> lock(slot.req->mu);
    slot.req->finish = why;
    slot.req->done = true;
  }
  slot.req->cv.notify_all();
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.requests_done;
  }
  free_[static_cast<size_t>(slot.owner)].push_back(slot.cache);  // cleared when next used
  slot.cache = -1;
}

bool Engine::advance(Slot& slot, ConstView logits) {
  Request& r = *slot.req;
  const int32_t next = sample(logits, r.sampling, slot.rng);
  std::vector<int32_t> tokens;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    r.tokens.push_back(next);
    tokens = r.tokens;
  }
  bool stopped = false;
  std::string text = decode_(tokens);
  text.resize(visible_end(text, r.stop, &stopped));
  const bool full = static_cast<int64_t>(tokens.size()) >= r.max_tokens;
  {
    std::lock_guard<std::mutex> lock(r.mu);
    r.text = std::move(text);
    if (full && !stopped && !r.stop.empty()) r.text = decode_(tokens);  // release a held tail
    r.marks.push_back(r.text.size());
  }
  r.cv.notify_all();
  if (stopped) {
    finish(slot, Finish::kStop);
    return true;
  }
  if (full) {
    finish(slot, Finish::kLength);
    return true;
  }
  return false;
}

void Engine::run_root(const std::function<bool()>& should_stop) {
  std::vector<int32_t> ids;
  std::vector<int64_t> order;  // [active] row of each sequence in the step's logits
  const int P = comm_.size();
  auto most_free = [&] {  // the rank to take a new sequence, -1 when all caches are in use
    int best = -1;
    for (int r = 0; r < P; ++r)
      if (!free_[static_cast<size_t>(r)].empty() &&
          (best < 0 ||
           free_[static_cast<size_t>(r)].size() > free_[static_cast<size_t>(best)].size()))
        best = r;
    return best;
  };
  for (;;) {
    if (should_stop && should_stop()) shutdown();
    // Leave: cancelled requests. Join: queued ones, while there is room.
    for (size_t i = 0; i < active_.size();) {
      if (active_[i].req->cancelled.load()) {
        finish(active_[i], Finish::kCancelled);
        active_.erase(active_.begin() + static_cast<int64_t>(i));
      } else {
        ++i;
      }
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (active_.empty() && queue_.empty() && accepting_.load()) {
        cv_.wait_for(lock, std::chrono::milliseconds(50));
        if (should_stop && should_stop()) accepting_.store(false);
      }
      while (!queue_.empty() && most_free() >= 0) {
        Slot s;
        s.req = std::move(queue_.front());
        queue_.pop_front();
        if (s.req->cancelled.load()) {
          lock.unlock();
          {
            std::lock_guard<std::mutex> rl(s.req->mu);
            s.req->finish = Finish::kCancelled;
            s.req->done = true;
          }
          s.req->cv.notify_all();
          lock.lock();
          ++stats_.requests_done;
          continue;
        }
        s.owner = most_free();
        s.cache = free_[static_cast<size_t>(s.owner)].back();
        free_[static_cast<size_t>(s.owner)].pop_back();
        s.rng.seed(s.req->sampling.seed);
        stats_.prompt_tokens += static_cast<int64_t>(s.req->prompt.size());
        active_.push_back(std::move(s));
      }
      stats_.queue_length = static_cast<int64_t>(queue_.size());
      if (active_.empty() && queue_.empty() && !accepting_.load()) break;
      if (active_.empty()) continue;
    }

    // One step: prompts of the newcomers, the latest token of everyone else.
    const int64_t n_seq = static_cast<int64_t>(active_.size());
    ids.clear();
    payload_.clear();
    std::vector<int64_t> before(static_cast<size_t>(P), 0);  // rows on lower ranks, then own
    for (const Slot& s : active_) ++before[static_cast<size_t>(s.owner)];
    for (int64_t r = 0, at = 0; r < P; ++r) {
      const int64_t n = before[static_cast<size_t>(r)];
      before[static_cast<size_t>(r)] = at;
      at += n;
    }
    order.clear();
    for (Slot& s : active_) {
      order.push_back(before[static_cast<size_t>(s.owner)]++);
      int64_t n = 1;
      if (!s.prefilled) {
        ids.insert(ids.end(), s.req->prompt.begin(), s.req->prompt.end());
        n = static_cast<int64_t>(s.req->prompt.size());
      } else {
        std::lock_guard<std::mutex> lock(s.req->mu);
        ids.push_back(s.req->tokens.back());
      }
      payload_.insert(payload_.end(), {s.owner, s.cache, n, s.prefilled ? 0 : 1});
    }
    payload_.insert(payload_.end(), ids.begin(), ids.end());
    int64_t desc[3] = {kStep, n_seq, static_cast<int64_t>(ids.size())};
    const double t0 = now_seconds();
    comm_.broadcast(desc, 3, 0, "serve step descriptor");
    ConstView logits = step(n_seq, desc[2]);
    const double exchange = model_.stats().exchange_seconds;
    // Per-expert load of this step (global figures: the plans count every rank's slots).
    {
      std::lock_guard<std::mutex> lock(mu_);
      const std::vector<const MoeLayer*> layers = model_.moe_layers();
      for (size_t i = 0; i < layers.size(); ++i) {
        const std::vector<int64_t>& load = layers[i]->stats().load.expert_tokens;
        for (size_t e = 0; e < load.size() && e < stats_.expert_load[i].size(); ++e)
          stats_.expert_load[i][e] += load[e];
      }
    }
    size_t kept = 0;
    int64_t generated = 0;
    for (size_t i = 0; i < active_.size(); ++i) {
      active_[i].prefilled = true;
      ++generated;
      if (advance(active_[i], logits.row_range(order[i], 1))) continue;
      if (kept != i) active_[kept] = std::move(active_[i]);
      ++kept;
    }
    const int64_t batch_size = static_cast<int64_t>(active_.size());
    active_.resize(kept);
    const double dt = now_seconds() - t0;
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.steps;
    stats_.batch_size = batch_size;
    stats_.tokens_generated += generated;
    stats_.last_step_seconds = dt;
    stats_.step_seconds_total += dt;
    stats_.exchange_seconds_total += exchange;
  }
  int64_t desc[3] = {kStop, 0, 0};
  comm_.broadcast(desc, 3, 0, "serve step descriptor");
}

}  // namespace moe::model::serve
