// File: model/train_loop.hpp — the per-step bookkeeping the two trainers share (model/train.cpp,
// model/single_gate_train.cpp): the loop's settings, step timing, the metrics file, the
// evaluation, progress and checkpoint cadence, the agreed stop signal and the run summary's common
// fields. Each trainer keeps what is its own (model, phases, PEER metrics, rebalancing, memory).
//
// Notation: s the 0-based optimiser step; steps [start, end) run in this launch of S_total =
// train.steps. Step s reports as s + 1; it is the last one when s + 1 = end.
//
// Per step, after the update:
//   count_step(dt, tokens)            timing for the summary and the ETA
//   eval_due(s)                       train.eval_every or the last step
//   report(s, loss, rec, line)        writes rec; rank 0 prints line(eta) at log.every, the first
//                                     and the last step
//   checkpoint_or_stop(s, entries)    collective: checkpoint at checkpoint.every, the last step or
//                                     an agreed stop signal; true when the loop must end
// After the loop: finish() gives the summary record's common fields; write_summary(record).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "comm/communicator.hpp"
#include "model/model_checkpoint.hpp"
#include "model/train.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/config.hpp"
#include "runtime/log.hpp"

namespace moe::model {

class TrainLoop {
 public:
  // Reads checkpoint.dir (empty: <run_dir>/checkpoints), checkpoint.every, checkpoint.keep,
  // train.eval_every, train.eval_batches, train.on_nonfinite and log.every. Local.
  TrainLoop(const Config& config, const std::string& run_dir, const comm::Communicator& comm);

  // Opens the metrics file on rank 0 (--metrics, else <run_dir>/metrics.jsonl with run.metrics)
  // and fixes the launch's steps [start_step, end_step) of total_steps. Local.
  void begin(const TrainOptions& options, int64_t start_step, int64_t end_step,
             int64_t total_steps);

  int64_t eval_batches() const { return eval_batches_; }
  bool skip_nonfinite() const { return skip_nonfinite_; }
  const std::string& checkpoint_dir() const { return ckpt_dir_; }
  const checkpoint::SaveOptions& save_options() const { return save_options_; }
  TrainSummary& summary() { return summary_; }

  bool last_step(int64_t s) const { return s + 1 == end_step_; }
  bool eval_due(int64_t s) const {
    return (eval_every_ > 0 && (s + 1) % eval_every_ == 0) || last_step(s);
  }
  void skip_step() { ++steps_skipped_; }
  void count_step(double seconds, double tokens);

  // Writes the step's record (rec["val_loss"], when present, becomes the summary's) and on rank 0
  // the progress line: line(eta_seconds) gives its text. Local.
  void report(int64_t s, double loss, const nlohmann::json& rec,
              const std::function<std::string(double)>& line);
  // Collective. Agrees on a stop signal; at checkpoint.every, the last step or a stop signal
  // writes a checkpoint of entries() (metadata: step s + 1, train.seed, the config) and logs it.
  // Returns true when a stop signal ends the launch before its last step (logged, recorded).
  bool checkpoint_or_stop(int64_t s, const std::function<CheckpointEntries()>& entries);

  // After the loop: fills summary's last_step and tokens_per_s; returns the summary record's
  // common fields (steps, skipped_steps, first/last step, loss, val_loss, tokens_per_s, ranks,
  // checkpoint, stopped_by_signal).
  nlohmann::json finish();
  // Writes the summary record and logs "done: <record>". Local.
  void write_summary(const nlohmann::json& record);

  double time_sum() const { return time_sum_; }
  int64_t steps_done() const { return steps_done_; }

 private:
  const Config& config_;
  const comm::Communicator& comm_;
  std::string run_dir_, ckpt_dir_;
  int64_t ckpt_every_ = 0, eval_every_ = 0, eval_batches_ = 0, log_every_ = 1;
  bool skip_nonfinite_ = false;
  checkpoint::SaveOptions save_options_;
  MetricsWriter metrics_;
  TrainSummary summary_;
  int64_t start_step_ = 0, end_step_ = 0, total_steps_ = 0;
  double time_sum_ = 0, tokens_sum_ = 0;
  int64_t steps_done_ = 0, steps_skipped_ = 0;
};

}  // namespace moe::model
