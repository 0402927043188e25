// moe-serve: an HTTP completion service over the expert-parallel model.
//   mpirun -np N build/bin/moe-serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]
//          [--max-batch 8] [--max-context L] [--data FILE] [--weights fp32|bf16]
// Every rank loads the dense weights and its own experts; --weights bf16 rounds the attention
// and expert weights to bf16 and decodes on bf16 copies (Transformer::pack_for_inference). Rank 0
// runs the HTTP server (cpp-httplib, a thread pool) and the engine; HTTP threads only queue
// requests and wait for their tokens: the main thread alone calls MPI (model/serve/engine.hpp).
// Endpoints:
//   POST /v1/completions   model/serve/api.hpp; "stream": true sends server-sent events
//   GET  /healthz          {"status": "ok"} (503 while shutting down)
//   GET  /metrics          JSON counters of the engine and the HTTP front end, and the
//                          cumulative per-expert load of every MoE layer
// SIGINT/SIGTERM: stop accepting, finish the queued and active requests, stop every rank,
// exit 0.
#include <httplib.h>
#include <sched.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <thread>

#include "comm/communicator.hpp"
#include "model/generate.hpp"
#include "model/serve/api.hpp"
#include "model/serve/engine.hpp"
#include "model/transformer.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/data.hpp"
#include "runtime/error.hpp"
#include "runtime/log.hpp"
#include "runtime/threads.hpp"

namespace {

using moe::cat;
using moe::model::serve::ApiError;
using moe::model::serve::Engine;
using moe::model::serve::Request;
using nlohmann::json;

volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_signal(int sig) {
  g_signal = sig;
}

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// The HTTP front end on rank 0: validates, queues and answers. Never calls MPI.
class Service {
 public:
  Service(Engine& engine, const moe::Tokenizer& tok, std::string model_name)
      : engine_(engine), tok_(tok), model_(std::move(model_name)), started_(unix_seconds()) {}

  std::vector<int32_t> encode(const std::string& text) {
    std::lock_guard<std::mutex> lock(tok_mu_);
    return tok_.encode(text);
  }
  std::string decode(const std::vector<int32_t>& ids) {
    std::lock_guard<std::mutex> lock(tok_mu_);
    return tok_.decode(ids);
  }

  void routes(httplib::Server& s) {
    s.Post("/v1/completions",
           [this](const httplib::Request& q, httplib::Response& r) { completions(q, r); });
    s.Get("/healthz", [this](const httplib::Request&, httplib::Response& r) {
      const bool ok = engine_.accepting();
      r.status = ok ? 200 : 503;
      r.set_content(json{{"status", ok ? "ok" : "shutting down"}}.dump(), "application/json");
    });
    s.Get("/metrics", [this](const httplib::Request&, httplib::Response& r) {
      r.set_content(metrics().dump(), "application/json");
    });
    s.set_error_handler([this](const httplib::Request&, httplib::Response& r) {
      if (!r.body.empty()) return;
      ++bad_requests_;
      r.set_content(
          moe::model::serve::dump(moe::model::serve::error_json(
              r.status, r.status == 404 ? "no such endpoint" : cat("HTTP status ", r.status))),
          "application/json");
    });
    s.set_exception_handler(
        [](const httplib::Request&, httplib::Response& r, std::exception_ptr e) {
          std::string what = "unknown error";
          try {
            std::rethrow_exception(e);
          } catch (const std::exception& x) {
            what = x.what();
          } catch (...) {
          }
          r.status = 500;
          r.set_content(moe::model::serve::dump(moe::model::serve::error_json(500, what)),
                        "application/json");
        });
  }

  json metrics() const {
    const moe::model::serve::EngineStats st = engine_.stats();
    return {{"requests", st.requests},
            {"requests_done", st.requests_done},
            {"requests_rejected", bad_requests_.load()},
            {"prompt_tokens", st.prompt_tokens},
            {"tokens_generated", st.tokens_generated},
            {"queue_length", st.queue_length},
            {"batch_size", st.batch_size},
            {"max_batch", engine_.options().max_batch},
            {"max_context", engine_.options().max_context},
            {"steps", st.steps},
            {"step_seconds_last", st.last_step_seconds},
            {"step_seconds_mean", st.steps ? st.step_seconds_total / double(st.steps) : 0.0},
            {"all2all_seconds_total", st.exchange_seconds_total},
            {"expert_load", st.expert_load},
            {"expert_load_blocks", st.expert_load_blocks},
            {"uptime_seconds", unix_seconds() - started_},
            {"accepting", engine_.accepting()}};
  }

 private:
  void reject(httplib::Response& r, int status, const std::string& message) {
    ++bad_requests_;
    r.status = status;
    r.set_content(moe::model::serve::dump(moe::model::serve::error_json(status, message)),
                  "application/json");
  }

  json chunk(const std::string& id, const std::string& text, const char* finish) const {
    json c = {{"index", 0}, {"text", text}, {"finish_reason", nullptr}};
    if (finish) c["finish_reason"] = finish;
    return {{"id", id},
            {"object", "text_completion"},
            {"created", static_cast<int64_t>(started_)},
            {"model", model_},
            {"choices", json::array({c})}};
  }

  // A token's event is chunk(id, text, nullptr) with "token_id" added to its choice, as
  // dump() writes it (keys sorted): "data: {"choices":[{...,"token_id":N}],<tail>\n\n. The
  // part after the choices is the same for every event of a request; it is made once
  // (event_tail) so that a token costs one escaped string instead of a JSON tree.
  std::string event_tail(const std::string& id) const {
    json c = chunk(id, "", nullptr);
    c.erase("choices");
    return moe::model::serve::dump(c).substr(1) + "\n\n";  // after the '{'
  }
  static void token_event(std::string& out, const std::string& tail, const std::string& text,
                          int32_t token) {
    out += R"(data: {"choices":[{"finish_reason":null,"index":0,"text":)";
    out += moe::model::serve::dump(json(text));
    out += R"(,"token_id":)";
    out += std::to_string(token);
    out += "}],";
    out += tail;
  }

  void completions(const httplib::Request& q, httplib::Response& r) {
    moe::model::serve::CompletionParams p;
    auto req = std::make_shared<Request>();
    try {
      p = moe::model::serve::parse_completion(q.body);
      req->prompt = encode(p.prompt);
      const int64_t n = static_cast<int64_t>(req->prompt.size());
      const int64_t ctx = engine_.options().max_context;
      if (n == 0) throw ApiError(400, "field 'prompt' encodes to no tokens");
      if (n >= ctx)
        throw ApiError(400, cat("the prompt is ", n, " tokens; the context holds ", ctx,
                                " (prompt + max_tokens)"));
      if (n + p.max_tokens > ctx)
        throw ApiError(400, cat("max_tokens = ", p.max_tokens, " exceeds the limit of ", ctx - n,
                                " for this prompt of ", n, " tokens (context ", ctx, ")"));
    } catch (const ApiError& e) {
      reject(r, e.status, e.what());
      return;
    }
    req->max_tokens = p.max_tokens;
    req->sampling = p.sampling;
    req->stop = p.stop;
    if (!engine_.submit(req)) {
      reject(r, 503, "the server is shutting down or its queue is full");
      return;
    }
    const std::string id = cat("cmpl-", ++next_id_);
    if (!p.stream) {
      std::unique_lock<std::mutex> lock(req->mu);
      req->cv.wait(lock, [&] { return req->done; });
      const int64_t n_prompt = static_cast<int64_t>(req->prompt.size());
      const int64_t n_out = static_cast<int64_t>(req->tokens.size());
      json out = chunk(id, req->text, moe::model::serve::finish_name(req->finish));
      out["choices"][0]["token_ids"] = req->tokens;
      out["usage"] = {{"prompt_tokens", n_prompt},
                      {"completion_tokens", n_out},
                      {"total_tokens", n_prompt + n_out}};
      r.set_content(moe::model::serve::dump(out), "application/json");
      return;
    }
    // Server-sent events: one per generated token (its piece of text and id), then the finish
    // and [DONE].
    auto sent = std::make_shared<size_t>(0);  // tokens sent
    auto tail = std::make_shared<const std::string>(event_tail(id));
    r.set_header("Cache-Control", "no-cache");
    r.set_chunked_content_provider(
        "text/event-stream",
        [this, req, sent, tail, id](size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> lock(req->mu);
          req->cv.wait_for(lock, std::chrono::milliseconds(200),
                           [&] { return req->done || req->marks.size() > *sent; });
          std::string events;
          for (; *sent < req->marks.size(); ++*sent) {
            const size_t end = std::min(req->marks[*sent], req->text.size());
            const size_t begin = *sent ? std::min(req->marks[*sent - 1], end) : 0;
            token_event(events, *tail, req->text.substr(begin, end - begin), req->tokens[*sent]);
          }
          const bool done = req->done;
          if (done) {
            // Text released at the end (a cut at a stop string, a held tail) goes in the last
            // event.
            const size_t shown =
                req->marks.empty() ? 0 : std::min(req->marks.back(), req->text.size());
            events += "data: " +
                      moe::model::serve::dump(chunk(id, req->text.substr(shown),
                                                    moe::model::serve::finish_name(req->finish))) +
                      "\n\ndata: [DONE]\n\n";
          }
          lock.unlock();
          if (!sink.is_writable() ||
              (!events.empty() && !sink.write(events.data(), events.size()))) {
            req->cancelled.store(true);  // the client left: free its batch slot
            return false;
          }
          if (done) sink.done();
          return true;
        },
        [req](bool success) {
          if (!success) req->cancelled.store(true);
        });
  }

  Engine& engine_;
  const moe::Tokenizer& tok_;
  std::mutex tok_mu_;
  std::string model_;
  double started_;
  std::atomic<int64_t> next_id_{0}, bad_requests_{0};
};

}  // namespace

int main(int argc, char** argv) {
  moe::comm::MpiSession mpi(&argc, &argv);
  return moe::run_or_die([&]() -> int {
    CLI::App app{"moe-serve: an HTTP completion service over a checkpoint"};
    std::string ckpt, data, host = "127.0.0.1", weights_name = "fp32";
    int port = 8000, max_batch = 8, threads_http = 0;
    int64_t max_context = 0;
    app.add_option("--checkpoint", ckpt, "checkpoint root or step directory")->required();
    app.add_option("--host", host, "address to bind (rank 0)");
    app.add_option("--port", port, "port to bind (rank 0)")->check(CLI::Range(1, 65535));
    app.add_option("--max-batch", max_batch, "sequences per decode step")
        ->check(CLI::Range(1, 4096));
    app.add_option("--max-context", max_context,
                   "positions per sequence, prompt + max_tokens (default: train.seq_len)")
        ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
    app.add_option("--http-threads", threads_http,
                   "HTTP worker threads, one per open connection (default: max(80, 2 x max batch))")
        ->check(CLI::Range(1, 4096));
    app.add_option("--data", data, "token file whose tokenizer to use (default: the run's)");
    app.add_option("--weights", weights_name,
                   "fp32, or bf16: attention and expert weights rounded to bf16 (half the bytes "
                   "a decode step reads)");
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      if (e.get_exit_code() == 0) return app.exit(e);
      throw moe::Error(moe::ErrorKind::kConfig, cat("moe-serve: ", e.what()));
    }
    // A streamed completion holds its HTTP thread until its last token: fewer threads than
    // max batch would leave batch slots that no connection can fill.
    if (threads_http == 0) threads_http = std::max(80, 2 * max_batch);
    const moe::WeightType weights = moe::parse_weight_type(weights_name);
    moe::comm::Communicator world = moe::comm::Communicator::world();
    moe::log::init(world.rank(), world.size(), "info");
    moe::ThreadPolicy threads;
    threads.apply(world.size());
    struct sigaction sa = {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    std::signal(SIGPIPE, SIG_IGN);

    moe::model::LoadedModel loaded = moe::model::load_for_inference(ckpt, data, world);
    moe::model::Transformer& model = *loaded.model;
    const moe::Config& config = loaded.config;
    const auto& tok = loaded.tokenizer;
    const moe::checkpoint::Metadata& meta = loaded.meta;

    moe::model::serve::EngineOptions eo;
    eo.max_batch = max_batch;
    eo.max_context = max_context > 0 ? max_context : config.get_int("train.seq_len");
    eo.weights = weights;
    std::unique_ptr<Service> service;
    Engine engine(model, world, eo,
                  [&service](const std::vector<int32_t>& ids) { return service->decode(ids); });
    service = std::make_unique<Service>(engine, *tok, cat("moe-", meta.step));

    // Rank 0 binds; every rank learns whether that worked before serving.
    httplib::Server server;
    socket_t listen_fd = INVALID_SOCKET;
    std::string error;
    if (world.rank() == 0) {
      server.new_task_queue = [threads_http] {
        return new httplib::ThreadPool(static_cast<size_t>(threads_http));
      };
      server.set_payload_max_length(size_t{1} << 20);
      // SO_REUSEADDR only: httplib's default adds SO_REUSEPORT, which would let a second
      // server share the port instead of failing. TCP_NODELAY (inherited by the accepted
      // sockets): each token's event leaves at once instead of waiting for the previous one's
      // ACK.
      server.set_socket_options([&listen_fd](socket_t sock) {
        int yes = 1;
        setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
        setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));
        listen_fd = sock;
      });
      service->routes(server);
      if (!server.bind_to_port(host, port))
        error = cat("moe-serve: cannot listen on ", host, ":", port);
      // Debian's compiled httplib listens with a backlog of 5: a burst of clients connecting
      // at once (a load generator's 32) overflows it and the kernel drops their handshakes,
      // which clients retry after 1 s, 2 s, ... Listening again on the bound socket raises it.
      else if (::listen(listen_fd, SOMAXCONN) != 0)
        error = cat("moe-serve: listen(", host, ":", port, "): ", std::strerror(errno));
    }
    world.agree(error, moe::ErrorKind::kConfig, "bind");
    std::thread http;
    if (world.rank() == 0) {
      http = std::thread([&server] {
        // mpirun binds rank 0 (and so every thread it starts) to one core; the HTTP threads
        // (started from this one, inheriting its mask) may run on any core of the node, so
        // that their work lands where a rank is waiting instead of always delaying rank 0's
        // share of each step.
        cpu_set_t all;
        CPU_ZERO(&all);
        const long n_cpus = sysconf(_SC_NPROCESSORS_ONLN);
        for (long c = 0; c < n_cpus && c < CPU_SETSIZE; ++c) CPU_SET(static_cast<int>(c), &all);
        sched_setaffinity(0, sizeof(all), &all);  // best effort: the binding stays on failure
        server.listen_after_bind();
      });
      std::printf(
          "moe-serve: listening on http://%s:%d (checkpoint step %lld, %d rank(s), "
          "max batch %d, context %lld, weights %s)\n",
          host.c_str(), port, static_cast<long long>(meta.step), world.size(), max_batch,
          static_cast<long long>(eo.max_context), moe::weight_type_name(weights));
      std::fflush(stdout);
    }
    engine.run([] { return g_signal != 0; });
    if (world.rank() == 0) {
      server.stop();
      http.join();
      const auto st = engine.stats();
      std::printf("moe-serve: stopped (signal %d): %lld requests, %lld tokens generated\n",
                  static_cast<int>(g_signal), static_cast<long long>(st.requests),
                  static_cast<long long>(st.tokens_generated));
      std::fflush(stdout);
    }
    return 0;
  });
}
