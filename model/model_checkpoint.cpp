#include "model/model_checkpoint.hpp"

#include "model/layers/peer.hpp"

namespace moe::model {

CheckpointEntries checkpoint_entries(Transformer& model,
                                     const std::function<AdamState&(const std::string&)>& state,
                                     bool replicas) {
  auto entry = [&](const std::string& name, View value) {
    if (!state) return checkpoint::TensorEntry{name, value, View(), View(), nullptr};
    AdamState& st = state(name);
    return checkpoint::TensorEntry{name, value, st.m.view(), st.v.view(), &st.step};
  };
  CheckpointEntries out;
  for (const ParamRef& p : model.dense_params()) out.dense.push_back(entry(p.name, p.value));
  for (auto& [name, value] : model.buffers())  // no optimiser state
    out.dense.push_back({name, value, View(), View(), nullptr});
  for (const Transformer::ExpertBankRef& ref : model.expert_banks()) {
    ExpertBank& bank = *ref.bank;
    for (int e = 0; e < bank.n_local(); ++e) {
      if (bank.is_replica(e) && !replicas) continue;  // written once, by the primary instance
      const int gid = bank.global_ids()[static_cast<size_t>(e)];
      const std::string prefix = cat(ref.prefix, "expert.", gid, ".");
      checkpoint::ExpertEntry x;
      x.layer = ref.layer;
      x.expert = gid;
      x.replica = bank.is_replica(e);
      x.tensors.push_back(entry(prefix + "w1", bank.w1(e)));
      x.tensors.back().name = "w1";
      x.tensors.push_back(entry(prefix + "w2", bank.w2(e)));
      x.tensors.back().name = "w2";
      out.experts.push_back(std::move(x));
    }
  }
  // PEER tables by (block, block of n_sub_keys rows = expert ids i n .. i n + n - 1).
  for (int l = 0; l < model.config().n_layers; ++l) {
    PeerLayer* peer = model.peer_layer(l);
    if (!peer) continue;
    const int64_t n = peer->config().n_sub_keys;
    for (int b = 0; b < peer->n_blocks_local(); ++b) {
      checkpoint::ExpertEntry x;
      x.layer = l;
      x.expert = peer->first_block() + b;
      for (const char* t : {"u", "v"}) {
        checkpoint::TensorEntry e = entry(cat("blocks.", l, ".peer.", t), View());
        e.name = t;
        e.value = (t[0] == 'u' ? peer->u() : peer->v()).row_range(int64_t{b} * n, n);
        if (e.adam_m.data) e.adam_m = e.adam_m.row_range(int64_t{b} * n, n);
        if (e.adam_v.data) e.adam_v = e.adam_v.row_range(int64_t{b} * n, n);
        x.tensors.push_back(e);
      }
      out.experts.push_back(std::move(x));
    }
  }
  return out;
}

}  // namespace moe::model
