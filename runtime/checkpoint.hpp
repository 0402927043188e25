// File: checkpoint.hpp — atomic HDF5 checkpoints with experts keyed by global id, loadable on
// any rank count (resharding).
//
// Notation: P ranks; L a MoE layer index; E a global expert id; "dense" tensors are replicated
// on every rank, "expert" tensors live on the one rank that owns (L, E).
//
// On disk (format_version 1), under the checkpoint root `dir`:
//
//   dir/latest                      text: the newest complete checkpoint, "step-00000120"
//   dir/step-00000120/model.h5      one HDF5 file per checkpoint:
//     /                             attributes: format_version (int), step (int), seed (int),
//                                   data_position (int), world_size (int, of the writer),
//                                   n_experts (int, expert entries over all layers),
//                                   config (string, the resolved YAML)
//     /rng_state                    uint64 [n] (present when n > 0)
//     /state/<name>                 int64 or float64 [n]: further run state by name, e.g. the
//                                   expert placement and load averages of comm.rebalance
//                                   (model/rebalance.hpp); absent in checkpoints without any
//     /model/dense/<name>           float32 [rows, cols]   replicated parameters, once
//     /model/experts/layer<L>/expert<E>/<name>  float32 [rows, cols]
//     /optim/m/...  /optim/v/...    Adam moments, the same tree as /model, each dataset with an
//                                   attribute `step` (updates applied); absent if not saved
//
// Writing: rank 0 writes the one file. Every rank first broadcasts its expert manifest (layer,
// id, names, shapes) so that all ranks can check that no expert is held twice; then rank 0
// writes the dense tensors and its own experts and receives every other rank's experts tensor
// by tensor (MPI_Send/MPI_Recv; memory on rank 0 is one tensor), in rank order. The file is
// written into dir/.tmp-step-<N>, fsynced, and the directory is renamed to dir/step-<N>; then
// `latest` is replaced atomically (write latest.tmp, fsync, rename) and checkpoints beyond the
// newest `keep` are deleted. A crash or an error at any point leaves the previous checkpoint
// and `latest` intact. If rank 0 fails while writing it keeps receiving (so no peer waits), and
// all ranks then throw the same Error.
//
// Loading: every rank opens the file read-only, reads every dense tensor and only the experts
// it asks for, by (layer, global id): any placement, any P. A rank may also read a replica of an
// expert another rank owns (ExpertEntry::replica): the same stored tensors, loaded twice. Errors,
// collective (every rank throws the same Error of kind kData): missing or unreadable file (named),
// not a checkpoint, unknown format version, a missing tensor or expert (named), a shape mismatch
// (tensor name and both shapes).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "runtime/tensor.hpp"

namespace moe::checkpoint {

constexpr int64_t kFormatVersion = 1;

// One tensor to save or to load into. adam_m/adam_v may be empty (data == nullptr): the
// optimiser state is then neither written nor read.
struct TensorEntry {
  std::string name;              // no '/': "embed.weight", "layer0.attn.qkv"; experts: "w1", "w2"
  View value;                    // [rows, cols]
  View adam_m;                   // [rows, cols] or empty
  View adam_v;                   // [rows, cols] or empty
  int64_t* adam_step = nullptr;  // updates applied (read on save, written on load), optional
};

// The tensors of one expert held on this rank.
struct ExpertEntry {
  int layer = 0;
  int expert = 0;  // global id
  std::vector<TensorEntry> tensors;
  // Loading only: a further instance of an expert that another entry (on some rank) owns; it is
  // read like the owner but not counted as a holder. save() skips such entries.
  bool replica = false;
};

// Further run state as named 1-D arrays (names without '/'), written by rank 0 under /state.
struct StateArrays {
  std::map<std::string, std::vector<int64_t>> ints;
  std::map<std::string, std::vector<double>> reals;
  bool empty() const { return ints.empty() && reals.empty(); }
};

// Everything besides tensors that a resumed run needs.
struct Metadata {
  int64_t step = 0;                 // optimiser steps completed
  int64_t seed = 0;                 // train.seed
  int64_t data_position = 0;        // where the data stream continues
  std::vector<uint64_t> rng_state;  // opaque RNG words (rank 0's)
  std::string config;               // the resolved YAML
  int64_t world_size = 0;           // the writer's P (filled in by save)
  StateArrays state;                // written by save; filled by load (and read_state)
};

struct SaveOptions {
  int keep = 3;  // checkpoint.keep: complete checkpoints kept, >= 1
  // Test hook, called on rank 0 at named stages ("file_created", "dense_written",
  // "experts_written", "synced", "renamed"); throwing from it simulates a crash there.
  std::function<void(const std::string& stage)> on_stage;
};

// The directory name of a step: "step-00000120".
std::string step_dir_name(int64_t step);

// Writes checkpoint dir/step-<meta.step> from every rank's tensors and returns its path.
// dense: the same names and shapes on every rank (rank 0's values are written). experts: this
// rank's experts; together the ranks must hold each (layer, id) at most once. Collective.
std::string save(const std::string& dir, const std::vector<TensorEntry>& dense,
                 const std::vector<ExpertEntry>& experts, const Metadata& meta,
                 const comm::Communicator& comm, const SaveOptions& options = {});

// The checkpoint directory `latest` names under root `dir`, or "" if there is none. Local.
std::string latest(const std::string& dir);

// Loads into the given views: every dense tensor and this rank's experts. `path` is a checkpoint
// root (its `latest` is followed) or one step directory. Returns the metadata. Collective.
Metadata load(const std::string& path, const std::vector<TensorEntry>& dense,
              const std::vector<ExpertEntry>& experts, const comm::Communicator& comm);

// The resolved configuration stored in a checkpoint (root or step directory). Local; throws a
// data Error naming the file when it is missing or not a checkpoint.
std::string read_config(const std::string& path);

// The /state arrays of a checkpoint (root or step directory); empty when it has none (older
// checkpoints). Local; throws like read_config, and on a /state dataset that is not 1-D
// int64 or float64.
StateArrays read_state(const std::string& path);

}  // namespace moe::checkpoint
