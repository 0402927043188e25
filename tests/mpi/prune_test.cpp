// moe-prune end to end under mpirun -np 1 and 2, on real HDF5 files: a model whose 8 experts
// per layer are 4 planted pairs (expert 2g+1 = expert 2g with its hidden neurons permuted, and
// a router column within ~1e-6 of 2g's), top-1 routing. Such a model computes the same function
// with the pairs merged, so:
//   - merge 8 -> 4 finds the pairs, and the pruned checkpoint, loaded again (also on this rank
//     count: it reshards like any other), gives the original logits within 1e-4;
//   - merge-noalign averages unaligned neurons and changes the logits by more than 1e-2 (the
//     comparison above can fail);
//   - E' = E gives back the original model: logits within 1e-6;
//   - bad input fails alike on every rank: a target above E, a dense checkpoint.
#include "model/prune.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>

#include "model/generate.hpp"
#include "model/transformer.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/data.hpp"

namespace fs = std::filesystem;
using moe::Config;
using moe::Error;
using moe::comm::Communicator;
using moe::model::Transformer;

namespace {

constexpr int kExperts = 8;
constexpr int64_t kSeq = 16;

std::string scratch(const Communicator& comm) {
  const std::string dir =
      (fs::temp_directory_path() / ("moe_prune_test_np" + std::to_string(comm.size()))).string();
  if (comm.rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  comm.barrier();
  return dir;
}

// A byte-level token file of the bundled genesis text.
std::string token_file(const std::string& dir, const Communicator& comm) {
  const std::string path = dir + "/genesis.h5";
  if (comm.rank() == 0) {
    std::ifstream in(std::string(MOE_TEST_DATA) + "/genesis.txt");
    std::stringstream ss;
    ss << in.rdbuf();
    moe::ByteTokenizer tok;
    std::vector<int32_t> ids = tok.encode(ss.str());
    const size_t cut = ids.size() * 9 / 10;
    moe::write_token_file(path, tok, {ids.begin(), ids.begin() + static_cast<int64_t>(cut)},
                          {ids.begin() + static_cast<int64_t>(cut), ids.end()}, {"genesis.txt"},
                          0.1);
  }
  comm.barrier();
  return path;
}

Config tiny_config(const std::string& data, int every_n) {
  return Config::load(
      "", {"data.path=" + data, "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
           "model.d_ff=32", "model.moe.num_experts=8", "model.moe.top_k=1", "model.moe.d_ff=24",
           "model.moe.every_n_layers=" + std::to_string(every_n), "train.seq_len=16",
           "train.micro_batch=4", "train.global_batch=8"});
}

// Saves the model's weights (no optimiser state) as a step-3 checkpoint under dir.
void save(Transformer& model, const Config& config, const std::string& dir,
          const Communicator& comm) {
  std::vector<moe::checkpoint::TensorEntry> dense;
  for (const auto& p : model.dense_params()) dense.push_back({p.name, p.value, {}, {}, nullptr});
  std::vector<moe::checkpoint::ExpertEntry> experts;
  for (int l = 0; l < model.config().n_layers; ++l) {
    moe::model::MoeLayer* m = model.moe_layer(l);
    if (!m) continue;
    for (int e = 0; e < m->experts().n_local(); ++e)
      experts.push_back({l,
                         m->experts().global_ids()[static_cast<size_t>(e)],
                         {{"w1", m->experts().w1(e), {}, {}, nullptr},
                          {"w2", m->experts().w2(e), {}, {}, nullptr}}});
  }
  moe::checkpoint::Metadata meta;
  meta.step = 3;
  meta.config = config.to_yaml();
  moe::checkpoint::save(dir, dense, experts, meta, comm);
}

// Expert 2g+1 := expert 2g with neurons permuted; router column 2g+1 := column 2g + 1e-6 noise.
void plant_pairs(Transformer& model) {
  for (int l = 0; l < model.config().n_layers; ++l) {
    moe::model::MoeLayer* m = model.moe_layer(l);
    moe::model::ExpertBank& bank = m->experts();
    const auto& ids = bank.global_ids();
    for (int e = 0; e < bank.n_local(); ++e) {
      const int gid = ids[static_cast<size_t>(e)];
      if (gid % 2 == 0) continue;
      const int src = static_cast<int>(std::find(ids.begin(), ids.end(), gid - 1) - ids.begin());
      ASSERT_LT(src, bank.n_local()) << "pairs share a rank with the blocked placement";
      std::vector<int> perm(static_cast<size_t>(bank.d_ff()));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), std::mt19937_64(100 * l + gid));
      moe::model::permute_neurons(bank.w1(src), bank.w2(src), perm, bank.activation(), bank.w1(e),
                                  bank.w2(e));
    }
    moe::View w = m->router().params().front().value;  // W_r [d, E]
    std::mt19937_64 rng(l);  // the same on every rank: the router is replicated
    std::normal_distribution<float> g(0.0f, 1e-6f);
    for (int64_t r = 0; r < w.rows; ++r)
      for (int c = 1; c < kExperts; c += 2) w.row(r)[c] = w.row(r)[c - 1] + g(rng);
  }
}

// Last-position logits of 6 val windows on rank 0 (the others feed nothing), flattened.
std::vector<float> logits(Transformer& model, const std::string& data, const Communicator& comm) {
  moe::TokenDataset val(data, "val", kSeq, 256);
  std::vector<float> out;
  for (int w = 0; w < 6; ++w) {
    std::vector<int32_t> win(kSeq + 1);
    val.read_windows(9, 0, w, 1, win.data());
    const bool root = comm.rank() == 0;
    moe::ConstView l = model.last_logits(
        std::span<const int32_t>(win.data(), root ? static_cast<size_t>(kSeq) : 0), root ? 1 : 0,
        root ? kSeq : 0);
    if (root) out.insert(out.end(), l.row(0), l.row(0) + l.cols);
  }
  return out;
}

// The tiny model with planted expert pairs, saved to <dir>/in, and its logits before pruning.
struct Planted {
  std::string dir, data;
  std::vector<float> ref;
};

Planted planted_checkpoint(const Communicator& comm) {
  Planted p;
  p.dir = scratch(comm);
  p.data = token_file(p.dir, comm);
  const Config config = tiny_config(p.data, 1);
  Transformer model(moe::model::ModelConfig::from(config, 256), comm, 5);
  plant_pairs(model);
  save(model, config, p.dir + "/in", comm);
  p.ref = logits(model, p.data, comm);
  return p;
}

// Options pruning the planted checkpoint to 4 experts into <dir>/<out>.
moe::model::PruneOptions prune_to_4(const Planted& p, const std::string& out) {
  moe::model::PruneOptions o;
  o.checkpoint = p.dir + "/in";
  o.task_data = p.data;
  o.output = p.dir + "/" + out;
  o.target = 4;
  o.tokens = 2048;
  return o;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    m = std::max(m, double(std::abs(a[i] - b[i])));
  return m;
}

}  // namespace

TEST(Prune, MergedPairsKeepTheModelsFunction) {
  const Communicator comm = Communicator::world();
  const Planted p = planted_checkpoint(comm);
  const std::string &dir = p.dir, &data = p.data;
  const std::vector<float>& ref = p.ref;
  moe::model::PruneOptions o = prune_to_4(p, "merge");
  const auto report = moe::model::prune_checkpoint(o, comm);
  ASSERT_EQ(report.plans.size(), 2u);
  for (size_t l = 0; l < 2; ++l) {
    for (int g = 0; g < 4; ++g) {
      EXPECT_EQ(report.plans[l].groups[static_cast<size_t>(g)].members,
                (std::vector<int>{2 * g, 2 * g + 1}))
          << "layer " << l;
      // Both members routed to: the alignment matters for the merge.
      EXPECT_GT(report.frequency[l][static_cast<size_t>(2 * g)], 0);
      EXPECT_GT(report.frequency[l][static_cast<size_t>(2 * g + 1)], 0);
    }
  }
  auto merged = moe::model::load_for_inference(dir + "/merge", data, comm);
  EXPECT_EQ(merged.model->config().moe.n_experts, 4);
  EXPECT_EQ(merged.meta.step, 3);
  const auto merged_logits = logits(*merged.model, data, comm);
  if (comm.rank() == 0) {
    EXPECT_LT(max_diff(ref, merged_logits), 1e-4);
  }

  o.output = dir + "/noalign";
  o.method = moe::model::PruneMethod::kMergeNoAlign;
  moe::model::prune_checkpoint(o, comm);
  auto noalign = moe::model::load_for_inference(dir + "/noalign", data, comm);
  const auto got = logits(*noalign.model, data, comm);
  if (comm.rank() == 0) {
    EXPECT_GT(max_diff(ref, got), 1e-2);
  }

  o.output = dir + "/same";
  o.method = moe::model::PruneMethod::kMerge;
  o.target = kExperts;
  moe::model::prune_checkpoint(o, comm);
  auto same = moe::model::load_for_inference(dir + "/same", data, comm);
  const auto same_logits = logits(*same.model, data, comm);
  if (comm.rank() == 0) {
    EXPECT_LT(max_diff(ref, same_logits), 1e-6);
  }

  // Bad input: every rank throws.
  o.output = dir + "/bad";
  o.target = kExperts + 1;
  EXPECT_THROW(moe::model::prune_checkpoint(o, comm), Error);
  o.target = 4;
  o.output = dir + "/in";
  EXPECT_THROW(moe::model::prune_checkpoint(o, comm), Error);
}

TEST(Prune, DenseCheckpointIsRejected) {
  const Communicator comm = Communicator::world();
  const std::string dir = scratch(comm), data = token_file(dir, comm);
  const Config config = tiny_config(data, 0);
  Transformer model(moe::model::ModelConfig::from(config, 256), comm, 5);
  save(model, config, dir + "/dense", comm);
  moe::model::PruneOptions o;
  o.checkpoint = dir + "/dense";
  o.task_data = data;
  o.output = dir + "/out";
  o.target = 2;
  try {
    moe::model::prune_checkpoint(o, comm);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is a dense model"), std::string::npos) << e.what();
  }
}

// --layers: only block 1 is pruned (8 -> 4, its planted pairs merged); block 0 keeps its 8
// experts. The checkpoint lists the counts (model.moe.layer_experts "8,4"), has a router of 8
// columns in block 0 and 4 in block 1, and, loaded again on one rank (fewer than it was written
// from when run on 2), gives the original logits: the merged pairs compute what they did.
TEST(Prune, OneLayerPrunedLoadsOnFewerRanks) {
  const Communicator comm = Communicator::world();
  const Planted p = planted_checkpoint(comm);
  const std::string &dir = p.dir, &data = p.data;
  const std::vector<float>& ref = p.ref;
  moe::model::PruneOptions o = prune_to_4(p, "layer1");
  o.layers = {1};
  const auto report = moe::model::prune_checkpoint(o, comm);
  ASSERT_EQ(report.plans.size(), 2u);
  EXPECT_EQ(report.plans[0].groups.size(), 8u);
  for (int g = 0; g < 4; ++g)
    EXPECT_EQ(report.plans[1].groups[static_cast<size_t>(g)].members,
              (std::vector<int>{2 * g, 2 * g + 1}));

  // Rank 0 alone (its own communicator) loads the checkpoint written by every rank.
  const Communicator one = comm.split(comm.rank() == 0 ? 0 : 1, comm.rank());
  if (comm.rank() == 0) {
    auto pruned = moe::model::load_for_inference(dir + "/layer1", data, one);
    const auto& mc = pruned.model->config();
    EXPECT_EQ(mc.experts(0), 8);
    EXPECT_EQ(mc.experts(1), 4);
    EXPECT_EQ(pruned.config.get_string("model.moe.layer_experts"), "8,4");
    EXPECT_EQ(pruned.model->moe_layer(0)->router().params().front().value.cols, 8);
    EXPECT_EQ(pruned.model->moe_layer(1)->router().params().front().value.cols, 4);
    EXPECT_EQ(pruned.model->moe_layer(1)->experts().n_local(), 4);
    EXPECT_LT(max_diff(ref, logits(*pruned.model, data, one)), 1e-4);
  }
  comm.barrier();

  // Pruning it again by a factor of 2 in block 0 only: every layer has 4, one count again.
  o.checkpoint = dir + "/layer1";
  o.output = dir + "/both";
  o.layers = {0};
  moe::model::prune_checkpoint(o, comm);
  auto both = moe::model::load_for_inference(dir + "/both", data, comm);
  EXPECT_EQ(both.config.get_int("model.moe.num_experts"), 4);
  EXPECT_EQ(both.config.get_string("model.moe.layer_experts"), "");
  const auto both_logits = logits(*both.model, data, comm);
  if (comm.rank() == 0) {
    EXPECT_LT(max_diff(ref, both_logits), 1e-4);
  }

  // A block that is not an MoE block: every rank throws, naming it.
  o.layers = {2};
  o.output = dir + "/bad";
  try {
    moe::model::prune_checkpoint(o, comm);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("block 2 is not an MoE block"), std::string::npos)
        << e.what();
  }
}

TEST(Prune, LayerExpertsConfigIsValidated) {
  auto from = [](const std::string& list) {
    return moe::model::ModelConfig::from(
        Config::load("", {"model.n_layers=2", "model.moe.num_experts=8", "model.moe.top_k=2",
                          "model.moe.layer_experts=" + list}),
        256);
  };
  EXPECT_EQ(from("8,4").experts(1), 4);
  EXPECT_EQ(from("8, 4").min_experts(), 4);
  EXPECT_TRUE(from("").layer_experts.empty());
  for (const char* bad : {"8", "8,4,2", "8,x", "8,1", "8,4.5"}) try {
      from(bad);
      ADD_FAILURE() << "no error for '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("model.moe.layer_experts"), std::string::npos)
          << e.what();
    }
}
