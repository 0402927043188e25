// Checkpoints on real HDF5 files under mpirun -np 1, 2 and 4: save and load on the same ranks,
// resharding between 4, 2 and 1 ranks (sub-communicators of the world), atomicity when a save
// fails midway, keep-last-K, and the errors for corrupt files, shape mismatches and missing
// experts. Tolerance: bitwise (fp32 values round-trip exactly).
#include "runtime/checkpoint.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>

#include "model/params.hpp"

namespace fs = std::filesystem;
using moe::Error;
using moe::Tensor;
using moe::View;
using moe::comm::Communicator;
namespace ckpt = moe::checkpoint;

namespace {

constexpr int kLayers = 2;
constexpr int kExperts = 8;  // per layer, global

// One tensor with its Adam moments; `value` may be a column window of a wider buffer.
struct Param {
  std::string name;
  Tensor value_buf, m, v;
  View value;
  int64_t step = 0;
  Param(std::string n, int64_t rows, int64_t cols, int64_t pad = 0)
      : name(std::move(n)),
        value_buf(Tensor({rows, cols + pad})),
        m(Tensor({rows, cols})),
        v(Tensor({rows, cols})),
        value(value_buf.view().col_range(0, cols)) {}
  // Values depend only on the tensor's global identity and the salt.
  void fill(uint64_t stream, uint64_t salt) {
    moe::model::init_uniform(value, 1.0f, salt, stream);
    moe::model::init_uniform(m.view(), 1.0f, salt + 1, stream);
    moe::model::init_uniform(v.view(), 1.0f, salt + 2, stream);
    step = static_cast<int64_t>(salt) * 10 + static_cast<int64_t>(stream % 7);
  }
  ckpt::TensorEntry entry() { return {name, value, m.view(), v.view(), &step}; }
  bool same(const Param& o) const {
    for (int64_t i = 0; i < value.rows; ++i)
      for (int64_t j = 0; j < value.cols; ++j)
        if (value(i, j) != o.value(i, j)) return false;
    for (int64_t k = 0; k < m.numel(); ++k)
      if (m[k] != o.m[k] || v[k] != o.v[k]) return false;
    return step == o.step;
  }
};

// A toy model: three dense tensors and the experts (layer, global id) this rank owns.
struct Model {
  std::vector<std::unique_ptr<Param>> dense;
  std::vector<std::pair<int, int>> owned;
  std::vector<std::vector<std::unique_ptr<Param>>> experts;  // [owned] -> w1, w2
  Model(std::vector<std::pair<int, int>> own, int64_t embed_cols = 5) : owned(std::move(own)) {
    dense.push_back(std::make_unique<Param>("embed", 7, embed_cols));
    dense.push_back(std::make_unique<Param>("layer0.norm1.g", 1, 5));
    dense.push_back(std::make_unique<Param>("lm_head", 5, 7, 3));  // strided
    for (size_t e = 0; e < owned.size(); ++e) {
      experts.emplace_back();
      experts.back().push_back(std::make_unique<Param>("w1", 5, 6));
      experts.back().push_back(std::make_unique<Param>("w2", 6, 5, 2));
    }
  }
  void fill(uint64_t salt) {
    for (size_t t = 0; t < dense.size(); ++t) dense[t]->fill(t, salt);
    for (size_t e = 0; e < owned.size(); ++e)
      for (size_t t = 0; t < 2; ++t)
        experts[e][t]->fill(1000 + owned[e].first * 100 + owned[e].second * 2 + t, salt);
  }
  std::vector<ckpt::TensorEntry> dense_entries() {
    std::vector<ckpt::TensorEntry> out;
    for (auto& p : dense) out.push_back(p->entry());
    return out;
  }
  std::vector<ckpt::ExpertEntry> expert_entries() {
    std::vector<ckpt::ExpertEntry> out;
    for (size_t e = 0; e < owned.size(); ++e) {
      out.push_back({owned[e].first, owned[e].second, {}});
      for (auto& p : experts[e]) out.back().tensors.push_back(p->entry());
    }
    return out;
  }
  // Every tensor equal to the same tensor of `ref` (which must own a superset of experts).
  bool same(const Model& ref) const {
    for (size_t t = 0; t < dense.size(); ++t)
      if (!dense[t]->same(*ref.dense[t])) return false;
    for (size_t e = 0; e < owned.size(); ++e) {
      size_t k = 0;
      while (k < ref.owned.size() && ref.owned[k] != owned[e]) ++k;
      if (k == ref.owned.size()) return false;
      for (size_t t = 0; t < 2; ++t)
        if (!experts[e][t]->same(*ref.experts[k][t])) return false;
    }
    return true;
  }
};

// Experts by contiguous blocks of global ids, or round-robin: two different placements.
std::vector<std::pair<int, int>> blocks(int rank, int size) {
  std::vector<std::pair<int, int>> out;
  for (int l = 0; l < kLayers; ++l)
    for (int e = 0; e < kExperts; ++e)
      if (e / (kExperts / size) == rank) out.emplace_back(l, e);
  return out;
}
std::vector<std::pair<int, int>> round_robin(int rank, int size) {
  std::vector<std::pair<int, int>> out;
  for (int l = 0; l < kLayers; ++l)
    for (int e = 0; e < kExperts; ++e)
      if ((e + l) % size == rank) out.emplace_back(l, e);
  return out;
}
std::vector<std::pair<int, int>> all_experts() {
  return blocks(0, 1);
}

ckpt::Metadata metadata(int64_t step) {
  ckpt::Metadata m;
  m.step = step;
  m.seed = 1234;
  m.data_position = 4096 + step;
  m.rng_state = {0x0123456789abcdefULL, static_cast<uint64_t>(step), ~0ULL};
  m.config = "train:\n  steps: 100\n";
  return m;
}

// A fresh shared scratch directory (rank 0 creates it, every rank gets its name).
std::string scratch(const Communicator& w, const char* tag) {
  std::string dir;
  if (w.rank() == 0) {
    std::string templ =
        (fs::temp_directory_path() / (std::string("moe-ckpt-") + tag + "-XXXXXX")).string();
    dir = mkdtemp(templ.data());
  }
  w.broadcast(dir, 0);
  return dir;
}

void cleanup(const Communicator& w, const std::string& dir) {
  w.barrier();
  if (w.rank() == 0) fs::remove_all(dir);
}

// Runs f and returns the Error's message, or "" if it did not throw.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Checkpoint, SaveAndLoadOnTheSameRanks) {
  Communicator w = Communicator::world();
  const std::string dir = scratch(w, "same");
  Model saved(blocks(w.rank(), w.size()));
  saved.fill(1);
  const std::string path =
      ckpt::save(dir, saved.dense_entries(), saved.expert_entries(), metadata(120), w);
  EXPECT_EQ(path, (fs::path(dir) / "step-00000120").string());
  EXPECT_EQ(ckpt::latest(dir), path);
  EXPECT_TRUE(fs::exists(fs::path(path) / "model.h5"));

  Model loaded(blocks(w.rank(), w.size()));
  loaded.fill(2);  // different values everywhere first
  ckpt::Metadata meta = ckpt::load(dir, loaded.dense_entries(), loaded.expert_entries(), w);
  EXPECT_TRUE(loaded.same(saved));
  EXPECT_EQ(meta.step, 120);
  EXPECT_EQ(meta.seed, 1234);
  EXPECT_EQ(meta.data_position, 4096 + 120);
  EXPECT_EQ(meta.world_size, w.size());
  EXPECT_EQ(meta.rng_state, metadata(120).rng_state);
  EXPECT_EQ(meta.config, "train:\n  steps: 100\n");

  // Loading the step directory itself, and the values alone (no optimiser state).
  Model values_only(round_robin(w.rank(), w.size()));
  auto dense = values_only.dense_entries();
  auto experts = values_only.expert_entries();
  for (auto& t : dense) t.adam_m = t.adam_v = View(), t.adam_step = nullptr;
  for (auto& e : experts)
    for (auto& t : e.tensors) t.adam_m = t.adam_v = View(), t.adam_step = nullptr;
  ckpt::load(path, dense, experts, w);
  for (size_t t = 0; t < 3; ++t)
    EXPECT_EQ(moe::max_rel_error(values_only.dense[t]->value, saved.dense[t]->value), 0.0);
  cleanup(w, dir);
}

TEST(Checkpoint, ReshardsBetweenFourTwoAndOneRanks) {
  Communicator w = Communicator::world();
  const std::string base = scratch(w, "reshard");
  Model reference(all_experts());
  reference.fill(3);
  std::vector<int> sizes;
  for (int s : {4, 2, 1})
    if (s <= w.size()) sizes.push_back(s);
  // Save from the first s ranks of the world (a sub-communicator), experts in blocks.
  for (int s : sizes) {
    Communicator sub = w.split(w.rank() / s, w.rank());
    if (w.rank() < s) {
      Model m(blocks(sub.rank(), sub.size()));
      m.fill(3);
      ckpt::save(base + "/from" + std::to_string(s), m.dense_entries(), m.expert_entries(),
                 metadata(s), sub);
    }
    w.barrier();
  }
  // Load every checkpoint on every size, experts round-robin: the same global tensors.
  for (int s_load : sizes) {
    Communicator sub = w.split(w.rank() / s_load, w.rank());
    if (w.rank() >= s_load) continue;
    for (int s_save : sizes) {
      Model m(round_robin(sub.rank(), sub.size()));
      m.fill(4);
      ckpt::Metadata meta = ckpt::load(base + "/from" + std::to_string(s_save), m.dense_entries(),
                                       m.expert_entries(), sub);
      EXPECT_TRUE(m.same(reference)) << "saved on " << s_save << ", loaded on " << s_load;
      EXPECT_EQ(meta.world_size, s_save);
      EXPECT_EQ(meta.step, s_save);
    }
  }
  cleanup(w, base);
}

TEST(Checkpoint, AFailedSaveKeepsThePreviousCheckpoint) {
  Communicator w = Communicator::world();
  const std::string dir = scratch(w, "atomic");
  Model good(blocks(w.rank(), w.size()));
  good.fill(5);
  ckpt::save(dir, good.dense_entries(), good.expert_entries(), metadata(10), w);
  const std::string previous = ckpt::latest(dir);

  Model newer(blocks(w.rank(), w.size()));
  newer.fill(6);
  for (const char* at : {"file_created", "dense_written", "experts_written", "synced", "renamed"}) {
    ckpt::SaveOptions opts;
    opts.on_stage = [&](const std::string& stage) {
      if (stage == at) throw std::runtime_error("simulated crash at " + stage);
    };
    const std::string msg = error_of([&] {
      ckpt::save(dir, newer.dense_entries(), newer.expert_entries(), metadata(20), w, opts);
    });
    EXPECT_NE(msg.find(std::string("simulated crash at ") + at), std::string::npos) << msg;
    EXPECT_NE(msg.find("previous checkpoint kept"), std::string::npos) << msg;
    // `latest` still names step 10, and it loads with step 10's values.
    EXPECT_EQ(ckpt::latest(dir), previous) << at;
    Model loaded(round_robin(w.rank(), w.size()));
    ckpt::Metadata meta = ckpt::load(dir, loaded.dense_entries(), loaded.expert_entries(), w);
    EXPECT_EQ(meta.step, 10) << at;
    Model ref(all_experts());
    ref.fill(5);
    EXPECT_TRUE(loaded.same(ref)) << at;
    w.barrier();
  }
  // No temporary directory is left behind.
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().rfind(".tmp-", 0), std::string::npos) << e.path();
  // Then the save succeeds (over the step-20 directory the "renamed" failure left).
  ckpt::save(dir, newer.dense_entries(), newer.expert_entries(), metadata(20), w);
  Model loaded(blocks(w.rank(), w.size()));
  EXPECT_EQ(ckpt::load(dir, loaded.dense_entries(), loaded.expert_entries(), w).step, 20);
  EXPECT_TRUE(loaded.same(newer));
  cleanup(w, dir);
}

TEST(Checkpoint, KeepsTheLastK) {
  Communicator w = Communicator::world();
  const std::string dir = scratch(w, "keep");
  Model m(blocks(w.rank(), w.size()));
  m.fill(7);
  ckpt::SaveOptions opts;
  opts.keep = 2;
  for (int64_t step : {100, 200, 300, 400})
    ckpt::save(dir, m.dense_entries(), m.expert_entries(), metadata(step), w, opts);
  w.barrier();
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step-00000300", "step-00000400"}));
  EXPECT_EQ(ckpt::latest(dir), (fs::path(dir) / "step-00000400").string());
  cleanup(w, dir);
}

TEST(Checkpoint, CorruptTruncatedAndMissingFilesAreNamed) {
  Communicator w = Communicator::world();
  const std::string dir = scratch(w, "corrupt");
  Model m(blocks(w.rank(), w.size()));
  m.fill(8);
  const std::string path = ckpt::save(dir, m.dense_entries(), m.expert_entries(), metadata(1), w);
  const std::string file = path + "/model.h5";
  auto load = [&](const std::string& p) {
    return error_of([&] { ckpt::load(p, m.dense_entries(), m.expert_entries(), w); });
  };

  if (w.rank() == 0) fs::resize_file(file, fs::file_size(file) / 2);
  w.barrier();
  std::string msg = load(dir);
  EXPECT_NE(msg.find(file), std::string::npos) << msg;
  EXPECT_NE(msg.find("corrupt or truncated"), std::string::npos) << msg;

  if (w.rank() == 0) std::ofstream(file, std::ios::trunc) << "not a checkpoint at all";
  w.barrier();
  msg = load(path);
  EXPECT_NE(msg.find(file + ": not an HDF5 file"), std::string::npos) << msg;

  msg = load(dir + "/nowhere");
  EXPECT_NE(msg.find("nowhere: no such checkpoint directory"), std::string::npos) << msg;
  cleanup(w, dir);
}

TEST(Checkpoint, ShapeMismatchAndMissingExpertAreNamed) {
  Communicator w = Communicator::world();
  const std::string dir = scratch(w, "shape");
  Model m(blocks(w.rank(), w.size()));
  m.fill(9);
  ckpt::save(dir, m.dense_entries(), m.expert_entries(), metadata(1), w);

  Model wider(blocks(w.rank(), w.size()), 6);  // embed [7, 6] against [7, 5] on disk
  std::string msg =
      error_of([&] { ckpt::load(dir, wider.dense_entries(), wider.expert_entries(), w); });
  EXPECT_NE(msg.find("tensor 'embed' has shape [7, 5] in the checkpoint, the model expects [7, 6]"),
            std::string::npos)
      << msg;

  // The last rank asks for expert 99 of layer 1 instead of one it should own.
  auto owned = blocks(w.rank(), w.size());
  if (w.rank() == w.size() - 1) owned.back() = {1, 99};
  Model stray(owned);
  msg = error_of([&] { ckpt::load(dir, stray.dense_entries(), stray.expert_entries(), w); });
  EXPECT_NE(msg.find("missing expert 99 of layer 1"), std::string::npos) << msg;

  // Too few experts requested: the checkpoint would be silently dropped in part.
  auto fewer = blocks(w.rank(), w.size());
  if (w.rank() == 0) fewer.pop_back();
  Model partial(fewer);
  msg = error_of([&] { ckpt::load(dir, partial.dense_entries(), partial.expert_entries(), w); });
  EXPECT_NE(msg.find("checkpoint holds 16 experts, the ranks load 15"), std::string::npos) << msg;

  // Two ranks claiming the same expert.
  if (w.size() > 1) {
    auto dup = blocks(w.rank(), w.size());
    if (w.rank() == 1) dup.front() = blocks(0, w.size()).front();
    Model twice(dup);
    msg = error_of([&] { ckpt::load(dir, twice.dense_entries(), twice.expert_entries(), w); });
    EXPECT_NE(msg.find("is held by ranks 0 and 1"), std::string::npos) << msg;
  }
  cleanup(w, dir);
}
