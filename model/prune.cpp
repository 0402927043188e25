#include "model/prune.hpp"

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>
#include <random>

#include "comm/placement.hpp"
#include "model/generate.hpp"
#include "runtime/checkpoint.hpp"
#include "runtime/data.hpp"
#include "runtime/error.hpp"
#include "runtime/gemm.hpp"
#include "runtime/h5.hpp"
#include "runtime/log.hpp"

namespace moe::model {

namespace fs = std::filesystem;

PruneMethod parse_prune_method(const std::string& name) {
  if (name == "merge") return PruneMethod::kMerge;
  if (name == "merge-noalign") return PruneMethod::kMergeNoAlign;
  if (name == "frequency") return PruneMethod::kFrequency;
  throw Error(ErrorKind::kConfig,
              cat("unknown prune method '", name, "' (merge | merge-noalign | frequency)"));
}

const char* prune_method_name(PruneMethod m) {
  switch (m) {
    case PruneMethod::kMerge:
      return "merge";
    case PruneMethod::kMergeNoAlign:
      return "merge-noalign";
    case PruneMethod::kFrequency:
      return "frequency";
  }
  return "?";
}

// -- spectral clustering -----------------------------------------------------------------------

namespace {

using Matrix = Eigen::MatrixXd;

double sq_dist(const Matrix& u, int i, const Matrix& c, int j) {
  return (u.row(i) - c.row(j)).squaredNorm();
}

// One k-means run from a k-means++ start: returns the assignment, fills inertia.
std::vector<int> kmeans_once(const Matrix& u, int k, std::mt19937_64& rng, double& inertia) {
  const int n = static_cast<int>(u.rows());
  Matrix c(k, u.cols());
  // k-means++: the first centre uniform, each next one with probability ~ squared distance to
  // the nearest chosen centre; points already chosen (distance 0) are never drawn again.
  std::vector<double> dmin(static_cast<size_t>(n), std::numeric_limits<double>::infinity());
  std::vector<char> chosen(static_cast<size_t>(n), 0);
  int first = static_cast<int>(std::uniform_int_distribution<int>(0, n - 1)(rng));
  c.row(0) = u.row(first);
  chosen[static_cast<size_t>(first)] = 1;
  for (int j = 1; j < k; ++j) {
    double total = 0;
    for (int i = 0; i < n; ++i) {
      dmin[static_cast<size_t>(i)] =
          std::min(dmin[static_cast<size_t>(i)], sq_dist(u, i, c, j - 1));
      if (!chosen[static_cast<size_t>(i)]) total += dmin[static_cast<size_t>(i)];
    }
    int pick = -1;
    if (total > 0) {
      double r = std::uniform_real_distribution<double>(0.0, total)(rng);
      for (int i = 0; i < n; ++i) {
        if (chosen[static_cast<size_t>(i)]) continue;
        pick = i;
        r -= dmin[static_cast<size_t>(i)];
        if (r <= 0 && dmin[static_cast<size_t>(i)] > 0) break;
      }
    } else {  // every remaining point sits on a centre: take the first one not yet chosen
      for (int i = 0; i < n && pick < 0; ++i)
        if (!chosen[static_cast<size_t>(i)]) pick = i;
    }
    chosen[static_cast<size_t>(pick)] = 1;
    c.row(j) = u.row(pick);
  }
  std::vector<int> group(static_cast<size_t>(n), -1);
  for (int iter = 0; iter < 100; ++iter) {
    bool changed = false;
    for (int i = 0; i < n; ++i) {
      int best = 0;
      for (int j = 1; j < k; ++j)
        if (sq_dist(u, i, c, j) < sq_dist(u, i, c, best)) best = j;
      if (group[static_cast<size_t>(i)] != best) changed = true;
      group[static_cast<size_t>(i)] = best;
    }
    // No empty group: an empty one takes the point farthest from its centre (among groups of
    // two or more points).
    std::vector<int> size(static_cast<size_t>(k), 0);
    for (int g : group) ++size[static_cast<size_t>(g)];
    for (int j = 0; j < k; ++j) {
      if (size[static_cast<size_t>(j)] > 0) continue;
      int far = -1;
      double fd = -1;
      for (int i = 0; i < n; ++i) {
        const int g = group[static_cast<size_t>(i)];
        if (size[static_cast<size_t>(g)] < 2) continue;
        const double dd = sq_dist(u, i, c, g);
        if (dd > fd) fd = dd, far = i;
      }
      --size[static_cast<size_t>(group[static_cast<size_t>(far)])];
      group[static_cast<size_t>(far)] = j;
      size[static_cast<size_t>(j)] = 1;
      changed = true;
    }
    c.setZero();
    for (int i = 0; i < n; ++i) c.row(group[static_cast<size_t>(i)]) += u.row(i);
    for (int j = 0; j < k; ++j) c.row(j) /= size[static_cast<size_t>(j)];
    if (!changed) break;
  }
  inertia = 0;
  for (int i = 0; i < n; ++i) inertia += sq_dist(u, i, c, group[static_cast<size_t>(i)]);
  return group;
}

// Renumbers groups by their smallest member.
std::vector<int> canonical(const std::vector<int>& group, int k) {
  std::vector<int> map(static_cast<size_t>(k), -1);
  std::vector<int> out(group.size());
  int next = 0;
  for (size_t i = 0; i < group.size(); ++i) {
    int& m = map[static_cast<size_t>(group[i])];
    if (m < 0) m = next++;
    out[i] = m;
  }
  return out;
}

}  // namespace

std::vector<int> spectral_cluster(const std::vector<float>& profiles, int n, int64_t T, int k,
                                  uint64_t seed) {
  MOE_CHECK(n >= 1 && k >= 1 && k <= n, "spectral_cluster: ", k, " groups of ", n, " items");
  MOE_CHECK_EQ(static_cast<int64_t>(profiles.size()), static_cast<int64_t>(n) * T,
               "spectral_cluster profiles");
  std::vector<int> group(static_cast<size_t>(n), 0);
  if (k == 1) return group;
  if (k == n) {
    std::iota(group.begin(), group.end(), 0);
    return group;
  }
  // 1. centre each token over the items, cosine similarity of the items.
  Matrix p(n, T);
  for (int i = 0; i < n; ++i)
    for (int64_t t = 0; t < T; ++t) p(i, t) = profiles[static_cast<size_t>(i * T + t)];
  p.rowwise() -= p.colwise().mean();
  Eigen::VectorXd norm = p.rowwise().norm();
  Matrix dist(n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      const double den = norm(i) * norm(j);
      const double cos = den > 0 ? p.row(i).dot(p.row(j)) / den : (i == j ? 1.0 : 0.0);
      dist(i, j) = i == j ? 0.0 : std::max(0.0, 1.0 - cos);
    }
  // 2. locally scaled Gaussian affinity.
  const int m = std::max(1, (n + k - 1) / k - 1);
  Eigen::VectorXd s(n);
  for (int i = 0; i < n; ++i) {
    std::vector<double> d;
    for (int j = 0; j < n; ++j)
      if (j != i) d.push_back(dist(i, j));
    std::nth_element(d.begin(), d.begin() + (m - 1), d.end());
    s(i) = std::max(d[static_cast<size_t>(m - 1)], 1e-6);
  }
  Matrix a(n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      a(i, j) = i == j ? 1.0 : std::exp(-dist(i, j) * dist(i, j) / (s(i) * s(j)));
  // 3. eigenvectors of the k smallest eigenvalues of I - D^-1/2 A D^-1/2.
  Eigen::VectorXd dinv = a.rowwise().sum().cwiseSqrt().cwiseInverse();
  Matrix lap = Matrix::Identity(n, n) - dinv.asDiagonal() * a * dinv.asDiagonal();
  Eigen::SelfAdjointEigenSolver<Matrix> eig(lap);
  MOE_CHECK(eig.info() == Eigen::Success, "spectral_cluster: eigen decomposition failed");
  Matrix u = eig.eigenvectors().leftCols(k);  // eigenvalues ascending
  for (int i = 0; i < n; ++i) {
    const double r = u.row(i).norm();
    if (r > 0) u.row(i) /= r;
  }
  // 4. k-means, best of several seeded starts.
  std::mt19937_64 rng(seed);
  double best = std::numeric_limits<double>::infinity();
  for (int run = 0; run < 8; ++run) {
    double inertia = 0;
    std::vector<int> g = kmeans_once(u, k, rng, inertia);
    if (inertia < best - 1e-12) best = inertia, group = g;
  }
  return canonical(group, k);
}

// -- exact linear assignment -------------------------------------------------------------------

std::vector<int> hungarian(const std::vector<double>& cost, int n) {
  MOE_CHECK_EQ(static_cast<int64_t>(cost.size()), static_cast<int64_t>(n) * n, "hungarian cost");
  // Shortest augmenting paths with row potentials u and column potentials v (1-based; column 0
  // is the virtual start). match[j] = row matched to column j.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(static_cast<size_t>(n) + 1, 0), v(static_cast<size_t>(n) + 1, 0);
  std::vector<int> match(static_cast<size_t>(n) + 1, 0), way(static_cast<size_t>(n) + 1, 0);
  std::vector<double> minv(static_cast<size_t>(n) + 1);
  std::vector<char> used(static_cast<size_t>(n) + 1);
  for (int i = 1; i <= n; ++i) {
    match[0] = i;
    int j0 = 0;
    std::fill(minv.begin(), minv.end(), inf);
    std::fill(used.begin(), used.end(), 0);
    do {
      used[static_cast<size_t>(j0)] = 1;
      const int i0 = match[static_cast<size_t>(j0)];
      const double* row = &cost[static_cast<size_t>(i0 - 1) * static_cast<size_t>(n)];
      double delta = inf;
      int j1 = 0;
      for (int j = 1; j <= n; ++j) {
        if (used[static_cast<size_t>(j)]) continue;
        const double cur = row[j - 1] - u[static_cast<size_t>(i0)] - v[static_cast<size_t>(j)];
        if (cur < minv[static_cast<size_t>(j)])
          minv[static_cast<size_t>(j)] = cur, way[static_cast<size_t>(j)] = j0;
        if (minv[static_cast<size_t>(j)] < delta) delta = minv[static_cast<size_t>(j)], j1 = j;
      }
      for (int j = 0; j <= n; ++j) {
        if (used[static_cast<size_t>(j)]) {
          u[static_cast<size_t>(match[static_cast<size_t>(j)])] += delta;
          v[static_cast<size_t>(j)] -= delta;
        } else {
          minv[static_cast<size_t>(j)] -= delta;
        }
      }
      j0 = j1;
    } while (match[static_cast<size_t>(j0)] != 0);
    do {  // augment along the path
      const int j1 = way[static_cast<size_t>(j0)];
      match[static_cast<size_t>(j0)] = match[static_cast<size_t>(j1)];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int> col(static_cast<size_t>(n));
  for (int j = 1; j <= n; ++j) col[static_cast<size_t>(match[static_cast<size_t>(j)] - 1)] = j - 1;
  return col;
}

// -- alignment and merging ---------------------------------------------------------------------

std::vector<int> align_neurons(ConstView w1_a, ConstView w1_b, Activation act) {
  MOE_CHECK_SHAPE(w1_b, w1_a.rows, w1_a.cols, "align_neurons w1_b");
  const int64_t d = w1_a.rows;
  const int64_t f = act == Activation::kSwiglu ? w1_a.cols / 2 : w1_a.cols;
  // sim[j][i] = <neuron j of a, neuron i of b>: (W1_a^T W1_b) summed over the gate and up
  // halves for SwiGLU.
  Tensor sim({f, f});
  View s = sim.view();
  gemm(Trans::kYes, Trans::kNo, 1.0f, ConstView(w1_a.data, d, f, w1_a.ld),
       ConstView(w1_b.data, d, f, w1_b.ld), 0.0f, s);
  if (act == Activation::kSwiglu)
    gemm(Trans::kYes, Trans::kNo, 1.0f, ConstView(w1_a.data + f, d, f, w1_a.ld),
         ConstView(w1_b.data + f, d, f, w1_b.ld), 1.0f, s);
  // Maximise the similarity = minimise its negative.
  std::vector<double> cost(static_cast<size_t>(f * f));
  for (int64_t j = 0; j < f; ++j)
    for (int64_t i = 0; i < f; ++i) cost[static_cast<size_t>(j * f + i)] = -double(s.row(j)[i]);
  return hungarian(cost, static_cast<int>(f));
}

void permute_neurons(ConstView w1, ConstView w2, const std::vector<int>& perm, Activation act,
                     View w1_out, View w2_out) {
  const int64_t f = w2.rows, d = w2.cols;
  MOE_CHECK_EQ(static_cast<int64_t>(perm.size()), f, "permute_neurons perm");
  MOE_CHECK_SHAPE(w1_out, w1.rows, w1.cols, "permute_neurons w1_out");
  MOE_CHECK_SHAPE(w2_out, f, d, "permute_neurons w2_out");
  const int halves = act == Activation::kSwiglu ? 2 : 1;
  for (int64_t r = 0; r < w1.rows; ++r)
    for (int h = 0; h < halves; ++h)
      for (int64_t j = 0; j < f; ++j)
        w1_out.row(r)[h * f + j] = w1.row(r)[h * f + perm[static_cast<size_t>(j)]];
  for (int64_t j = 0; j < f; ++j)
    std::copy_n(w2.row(perm[static_cast<size_t>(j)]), d, w2_out.row(j));
}

void merge_group(const MergeGroup& g, const std::vector<ConstView>& w1s,
                 const std::vector<ConstView>& w2s, Activation act, PruneMethod method, View w1_out,
                 View w2_out) {
  MOE_CHECK(!g.members.empty() && w1s.size() == g.members.size() && w2s.size() == g.members.size(),
            "merge_group: ", g.members.size(), " members, ", w1s.size(), " experts given");
  w1_out.fill(0.0f);
  w2_out.fill(0.0f);
  const auto ref_it = std::find(g.members.begin(), g.members.end(), g.reference);
  const size_t ref =
      ref_it == g.members.end() ? 0 : static_cast<size_t>(ref_it - g.members.begin());
  Tensor p1({w1_out.rows, w1_out.cols}), p2({w2_out.rows, w2_out.cols});
  for (size_t m = 0; m < g.members.size(); ++m) {
    ConstView a = w1s[m], b = w2s[m];
    if (method == PruneMethod::kMerge && m != ref) {
      const std::vector<int> perm = align_neurons(w1s[ref], w1s[m], act);
      permute_neurons(w1s[m], w2s[m], perm, act, p1.view(), p2.view());
      a = p1.view();
      b = p2.view();
    }
    const float w = static_cast<float>(g.weights[m]);
    for (int64_t r = 0; r < a.rows; ++r)
      for (int64_t c = 0; c < a.cols; ++c) w1_out.row(r)[c] += w * a.row(r)[c];
    for (int64_t r = 0; r < b.rows; ++r)
      for (int64_t c = 0; c < b.cols; ++c) w2_out.row(r)[c] += w * b.row(r)[c];
  }
}

void merge_router(ConstView w, const LayerPlan& plan, View w_out) {
  MOE_CHECK_SHAPE(w_out, w.rows, static_cast<int64_t>(plan.groups.size()), "merge_router w_out");
  for (int64_t r = 0; r < w.rows; ++r)
    for (size_t g = 0; g < plan.groups.size(); ++g) {
      const MergeGroup& mg = plan.groups[g];
      double acc = 0;
      for (size_t m = 0; m < mg.members.size(); ++m) acc += mg.weights[m] * w.row(r)[mg.members[m]];
      w_out.row(r)[g] = static_cast<float>(acc);
    }
}

LayerPlan plan_layer(int layer, const std::vector<float>& profiles, int n_experts, int64_t T,
                     const std::vector<int64_t>& frequency, int target, PruneMethod method,
                     uint64_t seed) {
  MOE_CHECK_EQ(static_cast<int>(frequency.size()), n_experts, "plan_layer frequency");
  LayerPlan plan;
  plan.layer = layer;
  if (method == PruneMethod::kFrequency) {
    std::vector<int> order(static_cast<size_t>(n_experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return frequency[static_cast<size_t>(a)] > frequency[static_cast<size_t>(b)];
    });
    order.resize(static_cast<size_t>(target));
    std::sort(order.begin(), order.end());
    for (int e : order) plan.groups.push_back({{e}, {1.0}, e});
    return plan;
  }
  // Seeded per layer, so that layers do not share k-means starts.
  const std::vector<int> group =
      spectral_cluster(profiles, n_experts, T, target, seed + 0x9E3779B97F4A7C15ULL * (layer + 1));
  plan.groups.resize(static_cast<size_t>(target));
  for (int e = 0; e < n_experts; ++e)
    plan.groups[static_cast<size_t>(group[static_cast<size_t>(e)])].members.push_back(e);
  for (MergeGroup& g : plan.groups) {
    double total = 0;
    for (int e : g.members) total += static_cast<double>(frequency[static_cast<size_t>(e)]);
    g.reference = g.members[0];
    for (int e : g.members) {
      g.weights.push_back(total > 0 ? static_cast<double>(frequency[static_cast<size_t>(e)]) / total
                                    : 1.0 / static_cast<double>(g.members.size()));
      if (frequency[static_cast<size_t>(e)] > frequency[static_cast<size_t>(g.reference)])
        g.reference = e;
    }
  }
  return plan;
}

DecodeTraffic decode_traffic(int64_t n_tokens, int k, int64_t d, int n_ranks,
                             const std::vector<int64_t>& frequency) {
  const int E = static_cast<int>(frequency.size());
  DecodeTraffic t;
  t.ranks_with_experts = std::min(n_ranks, E);
  const comm::ExpertPlacement place = comm::ExpertPlacement::blocked(E, t.ranks_with_experts);
  t.bytes_all = 2.0 * static_cast<double>(n_tokens) * k * static_cast<double>(d) * 4.0;
  double total = 0, remote = 0;
  for (int e = 0; e < E; ++e) {
    total += static_cast<double>(frequency[static_cast<size_t>(e)]);
    if (place.owner(e) != 0) remote += static_cast<double>(frequency[static_cast<size_t>(e)]);
  }
  const double share = total > 0
                           ? remote / total
                           : static_cast<double>(t.ranks_with_experts - 1) / t.ranks_with_experts;
  t.bytes_remote = t.bytes_all * share;
  t.messages = 2 * (t.ranks_with_experts - 1);
  return t;
}

// -- the driver --------------------------------------------------------------------------------

namespace {

// The model.h5 of a checkpoint root (following `latest`) or of one step directory, or "".
std::string model_file(const std::string& path) {
  if (fs::exists(fs::path(path) / "model.h5")) return (fs::path(path) / "model.h5").string();
  const std::string dir = checkpoint::latest(path);
  if (!dir.empty() && fs::exists(fs::path(dir) / "model.h5"))
    return (fs::path(dir) / "model.h5").string();
  return "";
}

// Rows of a 2-D dataset, or -1 when it is absent.
int64_t dataset_rows(const h5::File& f, const std::string& path) {
  if (!f.exists(path)) return -1;
  h5::Handle dset(H5Dopen2(f.id(), path.c_str(), H5P_DEFAULT));
  h5::Handle space(H5Dget_space(dset.id()));
  hsize_t dims[2] = {0, 0};
  if (H5Sget_simple_extent_ndims(space.id()) != 2) return -1;
  H5Sget_simple_extent_dims(space.id(), dims, nullptr);
  return static_cast<int64_t>(dims[0]);
}

bool same_path(const std::string& a, const std::string& b) {
  std::error_code ec1, ec2;
  const fs::path pa = fs::weakly_canonical(a, ec1), pb = fs::weakly_canonical(b, ec2);
  return !ec1 && !ec2 && pa == pb;
}

// Whether moe-prune prunes MoE block l: every MoE block, or those listed in --layers.
bool pruned(const PruneOptions& o, const ModelConfig& mc, int l) {
  return mc.is_moe(l) &&
         (o.layers.empty() || std::find(o.layers.begin(), o.layers.end(), l) != o.layers.end());
}

std::string router_name(int layer) {
  return cat("blocks.", layer, ".moe.router.w");
}

// What a pass of the task tokens through the model gives.
struct TaskPass {
  std::vector<std::vector<float>> profiles;     // [MoE layers] [E, T]
  std::vector<std::vector<int64_t>> frequency;  // [MoE layers] [E]
  int64_t tokens = 0;
  double loss = 0;
};

// Runs n_windows windows of the task split through the model, micro_batch windows per rank per
// forward, and collects router-logit profiles (when want_profiles) and routing frequencies.
// Collective.
TaskPass run_task(Transformer& model, const TokenDataset& data, int64_t n_windows,
                  int64_t micro_batch, uint64_t seed, bool want_profiles,
                  const comm::Communicator& comm) {
  const ModelConfig& mc = model.config();
  const int64_t S = data.seq_len(), P = comm.size(), r = comm.rank();
  const int64_t T = n_windows * S;
  std::vector<int> moe_blocks;
  for (int l = 0; l < mc.n_layers; ++l)
    if (mc.is_moe(l)) moe_blocks.push_back(l);
  TaskPass out;
  out.tokens = T;
  std::vector<std::vector<float>> logits(moe_blocks.size());  // [T, E] this rank's rows
  for (size_t i = 0; i < moe_blocks.size(); ++i) {
    const int E = mc.experts(moe_blocks[i]);
    out.frequency.emplace_back(static_cast<size_t>(E), 0);
    if (want_profiles) logits[i].assign(static_cast<size_t>(T * E), 0.0f);
  }
  std::vector<int32_t> windows;
  const int64_t per_batch = P * micro_batch;
  for (int64_t lo = 0; lo < n_windows; lo += per_batch) {
    const int64_t nb = std::min(per_batch, n_windows - lo);
    const int64_t first = lo + nb * r / P, count = lo + nb * (r + 1) / P - first;
    windows.resize(static_cast<size_t>(std::max<int64_t>(count, 1) * (S + 1)));
    if (count > 0) data.read_windows(seed, 0, first, count, windows.data());
    out.loss += model.forward(
        std::span<const int32_t>(windows.data(), static_cast<size_t>(count * (S + 1))), count, S,
        static_cast<double>(T));
    for (size_t i = 0; i < moe_blocks.size(); ++i) {
      MoeLayer& m = *model.moe_layer(moe_blocks[i]);
      const int E = mc.experts(moe_blocks[i]);
      const auto& slots = m.route().expert_slots;  // global
      for (int e = 0; e < E; ++e)
        out.frequency[i][static_cast<size_t>(e)] += slots[static_cast<size_t>(e)];
      if (want_profiles && count > 0) {
        View rows(logits[i].data() + first * S * E, count * S, E);
        // Every router's first parameter is W_r [d, E] ("router.w").
        gemm(Trans::kNo, Trans::kNo, 1.0f, m.input(), m.router().params().front().value, 0.0f,
             rows);
      }
    }
  }
  out.loss = comm.sum(out.loss, "prune: task loss");
  if (want_profiles)
    for (size_t i = 0; i < moe_blocks.size(); ++i) {
      const int E = mc.experts(moe_blocks[i]);
      comm.allreduce_sum(logits[i].data(), T * E, "prune: router profiles");
      std::vector<float> prof(static_cast<size_t>(E * T));
      for (int64_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e)
          prof[static_cast<size_t>(e * T + t)] = logits[i][static_cast<size_t>(t * E + e)];
      out.profiles.push_back(std::move(prof));
    }
  return out;
}

// The task split, opened on every rank; every rank fails alike. Collective.
std::unique_ptr<TokenDataset> open_task(const PruneOptions& o, int64_t seq_len, int64_t vocab,
                                        const comm::Communicator& comm) {
  std::unique_ptr<TokenDataset> data;
  std::string error;
  try {
    data = std::make_unique<TokenDataset>(o.task_data, o.split, seq_len, vocab);
  } catch (const Error& e) {
    error = e.message();
  }
  comm.agree(error, ErrorKind::kData, "prune: open task data");
  return data;
}

// Owned storage for one tensor and its optimiser state.
struct Owned {
  Tensor value, m, v;
  int64_t step = 0;
  Owned(int64_t rows, int64_t cols, bool adam) : value({rows, cols}) {
    if (adam) {
      m = Tensor({rows, cols});
      v = Tensor({rows, cols});
    }
  }
  checkpoint::TensorEntry entry(const std::string& name) {
    const bool adam = m.numel() > 0;
    return {name, value.view(), adam ? m.view() : View(), adam ? v.view() : View(), &step};
  }
};

}  // namespace

PruneReport prune_checkpoint(const PruneOptions& o, const comm::Communicator& comm) {
  // -- checks every rank can make, agreed before the first model collective
  Config config;
  ModelConfig mc;
  TokenFileInfo task;
  bool has_optim = false;
  std::string error;
  ErrorKind kind = ErrorKind::kConfig;
  try {
    if (same_path(o.output, o.checkpoint) ||
        (!model_file(o.checkpoint).empty() &&
         same_path(o.output,
                   fs::path(model_file(o.checkpoint)).parent_path().parent_path().string())))
      throw Error(ErrorKind::kConfig, cat("--output ", o.output, " is the input checkpoint ",
                                          o.checkpoint, "; write the pruned model elsewhere"));
    kind = ErrorKind::kData;
    config =
        Config::parse(checkpoint::read_config(o.checkpoint), o.checkpoint + " (stored config)");
    const std::string file = model_file(o.checkpoint);
    const h5::File f = h5::File::open(file);
    const int64_t vocab = dataset_rows(f, "/model/dense/embed.weight");
    if (vocab < 1) throw Error(ErrorKind::kData, cat(file, ": no embed.weight tensor"));
    has_optim = f.exists("/optim/m/dense/embed.weight");
    task = read_token_file_info(o.task_data);
    kind = ErrorKind::kConfig;
    mc = ModelConfig::from(config, vocab);
    if (mc.n_moe_layers() == 0)
      throw Error(ErrorKind::kConfig,
                  cat("checkpoint ", o.checkpoint, " is a dense model (model.moe.every_n_layers = ",
                      mc.moe_every_n, "): it has no experts to prune"));
    std::string moe_list;
    for (int l = 0; l < mc.n_layers; ++l)
      if (mc.is_moe(l)) moe_list += cat(moe_list.empty() ? "" : ",", l);
    for (int l : o.layers)
      if (l < 0 || l >= mc.n_layers || !mc.is_moe(l))
        throw Error(ErrorKind::kConfig,
                    cat("--layers ", l, ": block ", l, " is not an MoE block of ", o.checkpoint,
                        " (its MoE blocks: ", moe_list, ")"));
    for (int l = 0; l < mc.n_layers; ++l)
      if (pruned(o, mc, l) && o.target > mc.experts(l))
        throw Error(
            ErrorKind::kConfig,
            cat("--target-experts ", o.target, " is larger than the ", mc.experts(l), " experts",
                mc.layer_experts.empty() ? " per MoE layer" : cat(" of block ", l), " of ",
                o.checkpoint));
    if (o.target < std::max(1, mc.moe.top_k))
      throw Error(ErrorKind::kConfig, cat("--target-experts ", o.target,
                                          " is smaller than model.moe.top_k = ", mc.moe.top_k,
                                          " (each token needs top_k distinct experts)"));
    // The task tokens must be in the model's vocabulary: the same size as the data the model
    // was trained on (model.vocab_size 0 takes the data's), and its tokenizer when that file is
    // at hand.
    kind = ErrorKind::kData;
    const bool exact = config.get_int("model.vocab_size") == 0;
    if (exact ? task.vocab_size != vocab : task.vocab_size > vocab)
      throw Error(ErrorKind::kData,
                  cat("task data ", o.task_data, " has a vocabulary of ", task.vocab_size, " (",
                      task.tokenizer, " tokenizer), the model in ", o.checkpoint, " has ", vocab,
                      ": the task must be tokenized like the model's training data"));
    const std::string train_data = config.get_string("data.path");
    if (fs::exists(train_data)) {
      const TokenFileInfo ti = read_token_file_info(train_data);
      if (ti.tokenizer != task.tokenizer || ti.vocab_size != task.vocab_size ||
          (ti.tokenizer != "byte" &&
           h5::File::open(train_data).read_bytes("/tokenizer/model") !=
               h5::File::open(o.task_data).read_bytes("/tokenizer/model")))
        throw Error(ErrorKind::kData,
                    cat("task data ", o.task_data, " has another vocabulary (", task.tokenizer,
                        ", ", task.vocab_size, " ids) than the model's training data ", train_data,
                        " (", ti.tokenizer, ", ", ti.vocab_size, " ids)"));
    }
  } catch (const Error& e) {
    error = e.message();
    kind = e.kind();
  }
  comm.agree(error, kind, "prune: check input");

  const int64_t S = config.get_int("train.seq_len");
  const int64_t n_windows = std::max<int64_t>(1, (o.tokens + S - 1) / S);
  const std::unique_ptr<TokenDataset> data = open_task(o, S, mc.vocab_size, comm);

  // -- 1. profiles and frequencies over the task tokens
  PruneReport report;
  std::vector<int> moe_blocks;
  for (int l = 0; l < mc.n_layers; ++l)
    if (mc.is_moe(l)) moe_blocks.push_back(l);
  std::vector<std::string> dense_names;
  std::vector<std::pair<int64_t, int64_t>> dense_shapes;
  {
    LoadedModel loaded = load_for_inference(o.checkpoint, o.task_data, comm);
    for (const ParamRef& p : loaded.model->dense_params()) {
      dense_names.push_back(p.name);
      dense_shapes.emplace_back(p.value.rows, p.value.cols);
    }
    TaskPass pass = run_task(*loaded.model, *data, n_windows, config.get_int("train.micro_batch"),
                             o.seed, true, comm);
    report.tokens = pass.tokens;
    report.task_loss = pass.loss;
    report.frequency = pass.frequency;
    // -- 2. plans (every rank computes the same from the same gathered profiles)
    // (a block that is not pruned keeps every expert: the identity plan)
    for (size_t i = 0; i < moe_blocks.size(); ++i) {
      const int l = moe_blocks[i], E = mc.experts(l);
      report.plans.push_back(pruned(o, mc, l)
                                 ? plan_layer(l, pass.profiles[i], E, pass.tokens,
                                              pass.frequency[i], o.target, o.method, o.seed)
                                 : plan_layer(l, {}, E, pass.tokens, pass.frequency[i], E,
                                              PruneMethod::kFrequency, o.seed));
    }
  }

  // -- 3. every tensor: dense on every rank, every expert on rank 0
  const Activation act = mc.moe.activation;
  const int64_t d = mc.d_model, f = mc.moe.d_ff, f1 = act == Activation::kSwiglu ? 2 * f : f;
  std::vector<std::unique_ptr<Owned>> dense;
  for (const auto& [rows, cols] : dense_shapes)
    dense.push_back(std::make_unique<Owned>(rows, cols, has_optim));
  std::vector<checkpoint::TensorEntry> dense_in;
  for (size_t i = 0; i < dense.size(); ++i) dense_in.push_back(dense[i]->entry(dense_names[i]));
  const bool root = comm.rank() == 0;
  // old[layer index][expert] = {w1, w2}
  std::vector<std::vector<std::unique_ptr<Owned>>> old_w1(moe_blocks.size()),
      old_w2(moe_blocks.size());
  std::vector<checkpoint::ExpertEntry> experts_in;
  if (root)
    for (size_t i = 0; i < moe_blocks.size(); ++i)
      for (int e = 0; e < mc.experts(moe_blocks[i]); ++e) {
        old_w1[i].push_back(std::make_unique<Owned>(d, f1, has_optim));
        old_w2[i].push_back(std::make_unique<Owned>(f, d, has_optim));
        experts_in.push_back(
            {moe_blocks[i], e, {old_w1[i].back()->entry("w1"), old_w2[i].back()->entry("w2")}});
      }
  checkpoint::Metadata meta = checkpoint::load(o.checkpoint, dense_in, experts_in, comm);

  // -- 4. the pruned tensors
  std::vector<std::unique_ptr<Owned>> routers;
  std::vector<checkpoint::TensorEntry> dense_out;
  for (size_t i = 0; i < dense.size(); ++i) {
    const auto it = std::find_if(moe_blocks.begin(), moe_blocks.end(), [&](int l) {
      return pruned(o, mc, l) && router_name(l) == dense_names[i];
    });
    if (it == moe_blocks.end()) {  // as it was (also the routers of blocks not pruned)
      dense_out.push_back(dense[i]->entry(dense_names[i]));
      if (!has_optim) {  // a checkpoint without optimiser state gets a fresh one
        auto& t = *dense[i];
        t.m = Tensor({t.value.view().rows, t.value.view().cols});
        t.v = Tensor({t.value.view().rows, t.value.view().cols});
        dense_out.back() = t.entry(dense_names[i]);
      }
      continue;
    }
    const LayerPlan& plan = report.plans[static_cast<size_t>(it - moe_blocks.begin())];
    routers.push_back(std::make_unique<Owned>(d, o.target, true));
    merge_router(dense[i]->value.view(), plan, routers.back()->value.view());
    dense_out.push_back(routers.back()->entry(dense_names[i]));
  }
  std::vector<std::unique_ptr<Owned>> new_w;
  std::vector<checkpoint::ExpertEntry> experts_out;
  if (root)
    for (size_t i = 0; i < moe_blocks.size(); ++i)
      for (int g = 0; g < static_cast<int>(report.plans[i].groups.size()); ++g) {
        const MergeGroup& mg = report.plans[i].groups[static_cast<size_t>(g)];
        if (mg.members.size() == 1) {  // unchanged: value and optimiser state carried over
          const int e = mg.members[0];
          experts_out.push_back({moe_blocks[i],
                                 g,
                                 {old_w1[i][static_cast<size_t>(e)]->entry("w1"),
                                  old_w2[i][static_cast<size_t>(e)]->entry("w2")}});
          continue;
        }
        auto w1 = std::make_unique<Owned>(d, f1, true), w2 = std::make_unique<Owned>(f, d, true);
        std::vector<ConstView> w1s, w2s;
        for (int e : mg.members) {
          w1s.push_back(old_w1[i][static_cast<size_t>(e)]->value.view());
          w2s.push_back(old_w2[i][static_cast<size_t>(e)]->value.view());
        }
        merge_group(mg, w1s, w2s, act, o.method, w1->value.view(), w2->value.view());
        experts_out.push_back({moe_blocks[i], g, {w1->entry("w1"), w2->entry("w2")}});
        new_w.push_back(std::move(w1));
        new_w.push_back(std::move(w2));
      }
  if (!has_optim && root)  // singletons of an optimiser-less checkpoint: fresh state
    for (auto& x : experts_out)
      for (auto& t : x.tensors)
        if (!t.adam_m.data) {
          new_w.push_back(std::make_unique<Owned>(t.value.rows, t.value.cols, true));
          t.adam_m = new_w.back()->m.view();
          t.adam_v = new_w.back()->v.view();
        }

  // -- 5. write: the stored config with the new expert counts, the same step: one count for
  // every MoE layer in model.moe.num_experts, different counts in model.moe.layer_experts
  // (num_experts then the largest)
  Config out_config = config;
  std::vector<int> counts;
  for (const LayerPlan& plan : report.plans) counts.push_back(static_cast<int>(plan.groups.size()));
  const bool uniform =
      std::all_of(counts.begin(), counts.end(), [&](int c) { return c == counts[0]; });
  std::string list;
  for (int c : counts) list += cat(list.empty() ? "" : ",", c);
  out_config.set(cat("model.moe.num_experts=", *std::max_element(counts.begin(), counts.end())),
                 "moe-prune");
  out_config.set(cat("model.moe.layer_experts=", uniform ? "" : list), "moe-prune");
  meta.config = out_config.to_yaml();
  report.written = checkpoint::save(o.output, dense_out, experts_out, meta, comm);
  return report;
}

double task_loss(const std::string& checkpoint, const PruneOptions& o,
                 const comm::Communicator& comm) {
  LoadedModel loaded = load_for_inference(checkpoint, o.task_data, comm);
  const int64_t S = loaded.config.get_int("train.seq_len");
  const std::unique_ptr<TokenDataset> data =
      open_task(o, S, loaded.model->config().vocab_size, comm);
  return run_task(*loaded.model, *data, std::max<int64_t>(1, (o.tokens + S - 1) / S),
                  loaded.config.get_int("train.micro_batch"), o.seed, false, comm)
      .loss;
}

}  // namespace moe::model
