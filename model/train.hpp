// File: train.hpp — the training loop: data, accumulation, all-reduce, clipping, AdamW,
// evaluation, metrics, checkpoints, resume.
//
// Notation: P ranks, G = train.global_batch sequences per optimiser step, m = train.micro_batch
// sequences per rank per forward/backward, A = G / (m P) accumulation steps, T = train.seq_len.
//
// One optimiser step s:
//   for j < A:  rank r reads global windows [j m P + r m, j m P + (r + 1) m) of step s
//               forward (loss / (G T)), backward (aux losses scaled by 1 / A)
//               (in the last micro-step, dense gradients are all-reduced bucket by bucket as
//               backward finishes them)
//   global gradient norm over dense and expert parameters; clip; AdamW with the scheduled lr
// Since the windows of a step come from (seed, s, window index) and the loss is normalised by
// the global token count, the same config gives the same optimisation on any rank count.
#pragma once

#include <cstdint>
#include <string>

#include "comm/communicator.hpp"
#include "runtime/config.hpp"

namespace moe::model {

struct TrainOptions {
  std::string metrics_path;  // --metrics FILE: JSON lines, one per step (rank 0)
  std::string resume;        // --resume DIR: a checkpoint root or step directory
  int64_t stop_after = 0;    // --stop-after N: end this launch after N steps (0: run to the end)
};

// What a run ended with (rank 0's view; losses are global).
struct TrainSummary {
  int64_t first_step = 0, last_step = 0;  // steps [first, last) ran in this launch
  double last_loss = 0, last_val_loss = 0;
  double tokens_per_s = 0, mfu = 0;
  std::string checkpoint;     // the last checkpoint written, if any
  int stopped_by_signal = 0;  // SIGTERM or SIGUSR1 if a signal ended the launch early, else 0
};

// Makes SIGTERM and SIGUSR1 (what `sbatch --signal=USR1@60` sends before the time limit) request
// a stop: train() then finishes the current step on every rank, writes a checkpoint, prints
// "stopping at step N on signal <name>: checkpoint <dir>" on rank 0 and returns normally.
// train() installs them itself; call this earlier to cover start-up too. Idempotent.
void install_stop_signal_handlers();

// Used once per step by TrainLoop (model/train_loop.hpp), which both trainers share:
// The stop signal received on any rank so far (the largest signal number; 0: none). Collective,
// so every rank sees the same value after the same step.
int agree_stop_signal(const comm::Communicator& comm);
const char* stop_signal_name(int sig);  // "SIGTERM", "SIGUSR1"
// Whether step s + 1 (global loss and gradient norm) may update the weights: true when both are
// finite; otherwise train.on_nonfinite decides: stop throws a kData error naming the step, skip
// logs a warning naming it and returns false. The values are global: every rank decides alike.
bool step_is_finite(int64_t s, double loss, double grad_norm, bool skip_nonfinite);

// Runs training as configured. Collective over comm; throws moe::Error on bad input.
TrainSummary train(const Config& config, const TrainOptions& options,
                   const comm::Communicator& comm);

}  // namespace moe::model
