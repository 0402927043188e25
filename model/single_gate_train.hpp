// File: single_gate_train.hpp — moe-train for model.moe.router = single_gate: the phases of the
// single-gate MoE within train.steps.
//
// Notation: s the optimiser step, S_total = train.steps, G = train.global_batch sequences per
// step, T = train.seq_len, E experts, K = model.single_gate.kmeans_sequences.
//
//   (a) steps [0, a)          base model: shared blocks + ONE replicated copy of the later
//                             blocks + base head (SingleGatePhase::kBase); a = base_fraction *
//                             S_total, or 0 with model.single_gate.base_checkpoint (loaded first)
//   (b) at step a             K-means (Lloyd, kmeans_iters, initial centroids K-means-chosen by
//                             a shuffle from train.seed) on the pooled base features of K
//                             training sequences gathered from all ranks; identical on every
//                             rank. The centroids become the gate; every expert copies the
//                             base's later blocks.
//   (c) steps [a, S_total - g) experts train on the sequences the fixed gate sends them
//                             (kExperts); the embedding, shared blocks and base branch stay
//                             fixed unless model.single_gate.freeze_base = false
//   (d) steps [S_total - g, S_total)  the gate trains towards each sequence's best expert,
//                             experts frozen (kGate); g = gate_fraction * S_total
// Each phase has its own AdamW (fresh moments) and its own warmup + cosine schedule over its
// steps. Checkpoints hold every tensor (experts by global id: resharding works) and the moments
// of the current phase's optimiser; a resumed run continues the phase it stopped in (from a
// checkpoint taken at the end of (a) it runs (b) again, from the same data).
//
// Stop signals (SIGTERM, SIGUSR1) and train.on_nonfinite behave as in model/train.cpp (the
// shared helpers of model/train.hpp): checkpoint the step and return; skip or stop on a
// non-finite loss or gradient norm.
//
// Metrics per step: "phase", loss (kGate: the gate's cross-entropy), expert_imbalance and
// dead_experts (experts that received no sequence in the last 100 steps of (c) and (d)),
// router_kl (KL of the step's per-expert sequence counts to uniform), gate_accuracy in (d);
// evaluations score with early exit (model.single_gate.exit_threshold) and report
// val_exited, the fraction of held-out sequences that skipped their expert.
#pragma once

#include "comm/communicator.hpp"
#include "model/train.hpp"
#include "runtime/config.hpp"

namespace moe::model {

// Runs training as configured (router single_gate). Collective; throws moe::Error on bad input.
TrainSummary train_single_gate(const Config& config, const TrainOptions& options,
                               const comm::Communicator& comm);

}  // namespace moe::model
