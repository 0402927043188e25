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
  if (comm_.rank() != 0) return;
  for (int l = 0; l < model_.config().n_layers; ++l)
    if (model_.config().is_moe(l)) {
      stats_.expert_load_blocks.push_back(l);
      stats_.expert_load.emplace_back(static_cast<size_t>(model_.config().moe.n_experts), 0);
    }
  caches_.reserve(static_cast<size_t>(options_.max_batch));
  for (int i = 0; i < options_.max_batch; ++i)
    caches_.push_back(model_.new_cache(options_.max_context));
  for (auto& c : caches_) free_.push_back(&c);
  active_.reserve(caches_.size());
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
    int64_t desc[2] = {kStop, 0};
    comm_.broadcast(desc, 2, 0, "serve step descriptor");
    if (desc[0] == kStop) return;
    model_.extend({}, {}, {});
  }
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
  slot.cache->clear();
  free_.push_back(slot.cache);
  slot.cache = nullptr;
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
  std::vector<int64_t> n_new;
  std::vector<SequenceCache*> batch;
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
      while (!queue_.empty() && !free_.empty()) {
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
        s.cache = free_.back();
        free_.pop_back();
        s.rng.seed(s.req->sampling.seed);
        stats_.prompt_tokens += static_cast<int64_t>(s.req->prompt.size());
        active_.push_back(std::move(s));
      }
      stats_.queue_length = static_cast<int64_t>(queue_.size());
      if (active_.empty() && queue_.empty() && !accepting_.load()) break;
      if (active_.empty()) continue;
    }

    // One step: prompts of the newcomers, the latest token of everyone else.
    ids.clear();
    n_new.clear();
    batch.clear();
    for (Slot& s : active_) {
      if (!s.prefilled) {
        ids.insert(ids.end(), s.req->prompt.begin(), s.req->prompt.end());
        n_new.push_back(static_cast<int64_t>(s.req->prompt.size()));
      } else {
        std::lock_guard<std::mutex> lock(s.req->mu);
        ids.push_back(s.req->tokens.back());
        n_new.push_back(1);
      }
      batch.push_back(s.cache);
    }
    int64_t desc[2] = {kStep, static_cast<int64_t>(ids.size())};
    const double t0 = now_seconds();
    comm_.broadcast(desc, 2, 0, "serve step descriptor");
    ConstView logits = model_.extend(ids, n_new, batch);
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
      if (advance(active_[i], logits.row_range(static_cast<int64_t>(i), 1))) continue;
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
  int64_t desc[2] = {kStop, 0};
  comm_.broadcast(desc, 2, 0, "serve step descriptor");
}

}  // namespace moe::model::serve
