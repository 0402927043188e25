#include "model/train_loop.hpp"

#include <utility>

#include "runtime/log.hpp"

namespace moe::model {

TrainLoop::TrainLoop(const Config& config, const std::string& run_dir,
                     const comm::Communicator& comm)
    : config_(config), comm_(comm), run_dir_(run_dir) {
  ckpt_dir_ = config.get_string("checkpoint.dir").empty() ? run_dir + "/checkpoints"
                                                          : config.get_string("checkpoint.dir");
  ckpt_every_ = config.get_int("checkpoint.every");
  save_options_.keep = static_cast<int>(config.get_int("checkpoint.keep"));
  eval_every_ = config.get_int("train.eval_every");
  eval_batches_ = config.get_int("train.eval_batches");
  log_every_ = config.get_int("log.every");
  skip_nonfinite_ = config.get_string("train.on_nonfinite") == "skip";
}

void TrainLoop::begin(const TrainOptions& options, int64_t start_step, int64_t end_step,
                      int64_t total_steps) {
  metrics_ = MetricsWriter(
      options.metrics_path.empty() ? run_dir_ + "/metrics.jsonl" : options.metrics_path,
      comm_.rank() == 0 && (config_.get_bool("run.metrics") || !options.metrics_path.empty()));
  start_step_ = start_step;
  end_step_ = end_step;
  total_steps_ = total_steps;
  summary_.first_step = start_step;
}

void TrainLoop::count_step(double seconds, double tokens) {
  time_sum_ += seconds;
  tokens_sum_ += tokens;
  ++steps_done_;
}

void TrainLoop::report(int64_t s, double loss, const nlohmann::json& rec,
                       const std::function<std::string(double)>& line) {
  if (rec.contains("val_loss")) summary_.last_val_loss = rec["val_loss"].get<double>();
  metrics_.write(rec);
  summary_.last_loss = loss;
  if (comm_.rank() == 0 && ((s + 1) % log_every_ == 0 || last_step(s) || s == start_step_)) {
    const double eta = (time_sum_ / steps_done_) * static_cast<double>(end_step_ - s - 1);
    log::info0(line(eta));
  }
}

bool TrainLoop::checkpoint_or_stop(int64_t s, const std::function<CheckpointEntries()>& entries) {
  // A stop signal (Slurm's --signal before the time limit, or SIGTERM) on any rank: all ranks
  // see the same maximum signal number after this step, checkpoint it and leave the loop.
  const int stop_signal = agree_stop_signal(comm_);
  if ((ckpt_every_ > 0 && (s + 1) % ckpt_every_ == 0) || last_step(s) || stop_signal != 0) {
    checkpoint::Metadata meta;
    meta.step = s + 1;
    meta.seed = config_.get_int("train.seed");
    meta.data_position = s + 1;
    meta.config = config_.to_yaml();
    CheckpointEntries e = entries();
    meta.state = std::move(e.state);
    summary_.checkpoint =
        checkpoint::save(ckpt_dir_, e.dense, e.experts, meta, comm_, save_options_);
    log::info0("checkpoint ", summary_.checkpoint);
  }
  if (stop_signal != 0 && !last_step(s)) {
    summary_.stopped_by_signal = stop_signal;
    log::info0("stopping at step ", s + 1, " on signal ", stop_signal_name(stop_signal),
               ": checkpoint ", summary_.checkpoint);
    return true;
  }
  return false;
}

nlohmann::json TrainLoop::finish() {
  summary_.last_step = start_step_ + steps_done_;
  summary_.tokens_per_s = time_sum_ > 0 ? tokens_sum_ / time_sum_ : 0;
  nlohmann::json record = {{"summary", true},
                           {"steps", steps_done_},
                           {"skipped_steps", steps_skipped_},
                           {"first_step", start_step_},
                           {"last_step", summary_.last_step},
                           {"loss", summary_.last_loss},
                           {"val_loss", summary_.last_val_loss},
                           {"tokens_per_s", summary_.tokens_per_s},
                           {"ranks", comm_.size()},
                           {"checkpoint", summary_.checkpoint}};
  if (summary_.stopped_by_signal != 0)
    record["stopped_by_signal"] = stop_signal_name(summary_.stopped_by_signal);
  return record;
}

void TrainLoop::write_summary(const nlohmann::json& record) {
  metrics_.write(record);
  log::info0("done: ", record.dump());
}

}  // namespace moe::model
