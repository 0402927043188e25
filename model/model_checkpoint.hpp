// File: model_checkpoint.hpp — which tensors of a Transformer a checkpoint holds, in one list
// for saving, resuming and loading for inference.
//
// Dense tensors (replicated parameters, then buffers such as topk_bias router biases and PEER
// batch-norm statistics, which have no optimiser state) are stored once by name; expert tensors
// by (layer, global id): each ExpertBank's experts ("w1", "w2"), and PEER tables as blocks of
// n_sub_keys rows ("u", "v"), so any rank count reads them back. Replica instances of an expert
// (comm.rebalance.replicas) are left out by default: the primary writes the expert once; for
// loading into a restored placement they are listed as replica entries (read, not owned).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "model/optim.hpp"
#include "model/transformer.hpp"
#include "runtime/checkpoint.hpp"

namespace moe::model {

struct CheckpointEntries {
  std::vector<checkpoint::TensorEntry> dense;
  std::vector<checkpoint::ExpertEntry> experts;
  checkpoint::StateArrays state = {};  // further run state to save (comm.rebalance's placement)
};

// state(name) gives the optimiser state of the parameter called name (its moments and step go
// with the values); an empty function means values only (inference). With replicas, replica
// instances are listed too (ExpertEntry::replica), for loading. Local.
CheckpointEntries checkpoint_entries(Transformer& model,
                                     const std::function<AdamState&(const std::string&)>& state,
                                     bool replicas = false);

}  // namespace moe::model
