// Incremental decoding: logits from the KV cache (batched prefill of sequences of different
// lengths, then decode steps with one new token each) equal the full recompute of
// last_logits() within 1e-4 absolute, on any rank count. Rank 0 holds the sequences; the
// other ranks join every forward with no tokens, as in serving. One case runs the experts on
// their packed copies (Transformer::pack_for_inference), as the server does.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "comm/communicator.hpp"
#include "model/transformer.hpp"

using moe::ConstView;
using moe::comm::Communicator;
using moe::model::ModelConfig;
using moe::model::SequenceCache;
using moe::model::Transformer;

namespace {

ModelConfig tiny(int every_n) {
  ModelConfig c;
  c.vocab_size = 61;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 24;
  c.moe_every_n = every_n;
  c.moe.n_experts = 4;
  c.moe.top_k = 2;
  c.moe.d_ff = 12;
  return c;
}

constexpr double kTol = 1e-4;

// Max |a - b| over the rows of two logits views.
double max_diff(ConstView a, ConstView b) {
  double m = 0;
  for (int64_t j = 0; j < a.cols; ++j) m = std::max(m, std::abs(double(a(0, j)) - b(0, j)));
  return m;
}

void check_decode(int every_n, bool umoe = false, bool share = false, bool packed = false) {
  Communicator world = Communicator::world();
  const bool root = world.rank() == 0;
  ModelConfig cfg = tiny(every_n);
  if (umoe) {  // UMoE attention: the cache holds its rotated key and the hidden states
    cfg.umoe_attention = true;
    cfg.share_attention_ffn = share;
    cfg.umoe.d_qk = 6;
    cfg.umoe.query_rank = 3;
    cfg.umoe.shared_experts = 1;
  }
  Transformer model(cfg, world, 99);
  if (packed) model.pack_for_inference();  // extend() on the packed experts, as the server
  std::mt19937 rng(5);
  const std::vector<int64_t> prompt_len = {5, 9, 2};
  const int64_t B = static_cast<int64_t>(prompt_len.size()), steps = 6, max_context = 20;
  std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < prompt_len[static_cast<size_t>(b)]; ++t)
      seqs[static_cast<size_t>(b)].push_back(static_cast<int32_t>(rng() % cfg.vocab_size));
  std::vector<SequenceCache> caches;
  std::vector<SequenceCache*> ptrs;
  for (int64_t b = 0; b < B; ++b) caches.push_back(model.new_cache(max_context));
  for (auto& c : caches) ptrs.push_back(&c);

  // The reference: last_logits of sequence b in full (every rank calls; others with none).
  auto reference = [&](int64_t b) {
    const auto& s = seqs[static_cast<size_t>(b)];
    const int64_t len = root ? static_cast<int64_t>(s.size()) : 0;
    std::span<const int32_t> ids;
    if (root) ids = s;
    ConstView l = model.last_logits(ids, root ? 1 : 0, len);
    std::vector<float> out(l.data, l.data + l.rows * l.cols);
    return out;
  };

  // Batched prefill of all three prompts in one step.
  std::vector<int32_t> ids;
  std::vector<int64_t> n_new;
  std::vector<SequenceCache*> batch;
  if (root) {
    for (const auto& s : seqs) ids.insert(ids.end(), s.begin(), s.end());
    n_new = prompt_len;
    batch = ptrs;
  }
  ConstView l = model.extend(ids, n_new, batch);
  std::vector<float> got(l.data, l.data + l.rows * l.cols);
  std::vector<bool> fresh(static_cast<size_t>(B), true);  // got holds this step's logits of b
  for (int64_t step = 0; step <= steps; ++step) {
    for (int64_t b = 0; b < B; ++b) {
      std::vector<float> want = reference(b);
      if (root && fresh[static_cast<size_t>(b)]) {
        ConstView g(got.data() + b * cfg.vocab_size, 1, cfg.vocab_size);
        EXPECT_LT(max_diff(g, ConstView(want.data(), 1, cfg.vocab_size)), kTol)
            << "sequence " << b << " step " << step;
        EXPECT_EQ(caches[static_cast<size_t>(b)].len(),
                  static_cast<int64_t>(seqs[static_cast<size_t>(b)].size()));
      }
    }
    if (step == steps) break;
    // One decode step over the sequences still running: sequence 1 leaves after step 2, as in
    // continuous batching.
    std::vector<int32_t> last;
    std::vector<SequenceCache*> active;
    std::vector<int64_t> which;
    if (root)
      for (int64_t b = 0; b < B; ++b) {
        if (b == 1 && step >= 2) continue;
        const auto t = static_cast<int32_t>(rng() % cfg.vocab_size);
        seqs[static_cast<size_t>(b)].push_back(t);
        last.push_back(t);
        active.push_back(ptrs[static_cast<size_t>(b)]);
        which.push_back(b);
      }
    ConstView d = model.decode_step(last, active);
    std::fill(fresh.begin(), fresh.end(), false);
    for (size_t i = 0; i < which.size(); ++i) {
      std::copy_n(d.row(static_cast<int64_t>(i)), cfg.vocab_size,
                  got.data() + which[i] * cfg.vocab_size);
      fresh[static_cast<size_t>(which[i])] = true;
    }
  }
}

TEST(Decode, KvCacheMatchesFullRecomputeMoe) {
  check_decode(1);
}
TEST(Decode, KvCacheMatchesFullRecomputeMoePackedExperts) {
  check_decode(1, false, false, true);
}
TEST(Decode, KvCacheMatchesFullRecomputeMixed) {
  check_decode(2);
}
TEST(Decode, KvCacheMatchesFullRecomputeUmoeShared) {
  check_decode(1, true, true);
}
TEST(Decode, KvCacheMatchesFullRecomputeUmoeAttentionOnly) {
  check_decode(0, true);
}
TEST(Decode, KvCacheMatchesFullRecomputeDense) {
  check_decode(0);
}

TEST(Decode, CacheOverflowIsAnError) {
  Communicator world = Communicator::world();
  Transformer model(tiny(0), world, 1);  // dense: no collective, any rank alone
  SequenceCache c = model.new_cache(4);
  std::vector<int32_t> ids = {1, 2, 3, 4, 5};
  EXPECT_THROW(model.prefill(ids, c), moe::Error);
}

}  // namespace
