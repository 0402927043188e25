#include "runtime/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <type_traits>
#include <utility>

#include "runtime/h5.hpp"

namespace moe::checkpoint {

namespace fs = std::filesystem;
using h5::Handle;

namespace {

constexpr const char* kFileName = "model.h5";
constexpr int kTag = 4242;

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw Error(ErrorKind::kData, cat(file, ": ", what));
}

std::string shape_str(int64_t rows, int64_t cols) {
  return cat("[", rows, ", ", cols, "]");
}

bool has(View v) {
  return v.data != nullptr;
}

// -- manifests: what each rank holds, known to every rank -----------------------------------

struct TensorInfo {
  std::string name;
  int64_t rows = 0, cols = 0;
  bool adam = false;
};
struct ExpertInfo {
  int layer = 0, expert = 0;
  std::vector<TensorInfo> tensors;
};

std::string expert_group(int layer, int expert) {
  return cat("/experts/layer", layer, "/expert", expert);
}

// Checks one entry list locally; returns "" or the first problem.
std::string check_entries(const std::vector<TensorEntry>& entries, const std::string& where) {
  std::set<std::string> names;
  for (const TensorEntry& t : entries) {
    if (t.name.empty() || t.name.find('/') != std::string::npos || t.name == "." || t.name == "..")
      return cat(where, ": tensor name '", t.name, "' must be non-empty and contain no '/'");
    if (!names.insert(t.name).second) return cat(where, ": tensor '", t.name, "' given twice");
    if (has(t.adam_m) != has(t.adam_v))
      return cat(where, ": tensor '", t.name, "' has only one of adam_m, adam_v");
    for (View s : {t.adam_m, t.adam_v})
      if (has(s) && (s.rows != t.value.rows || s.cols != t.value.cols))
        return cat(where, ": optimiser state of '", t.name, "' is ", shape_str(s.rows, s.cols),
                   ", the tensor ", shape_str(t.value.rows, t.value.cols));
  }
  return "";
}

std::string encode(const std::vector<ExpertEntry>& experts) {
  std::ostringstream os;
  os << experts.size() << '\n';
  for (const ExpertEntry& e : experts) {
    os << e.layer << ' ' << e.expert << ' ' << e.tensors.size() << '\n';
    for (const TensorEntry& t : e.tensors)
      os << t.name << ' ' << t.value.rows << ' ' << t.value.cols << ' ' << has(t.adam_m) << '\n';
  }
  return os.str();
}

std::vector<ExpertInfo> decode(const std::string& s) {
  std::istringstream is(s);
  size_t n = 0;
  is >> n;
  std::vector<ExpertInfo> out(n);
  for (ExpertInfo& e : out) {
    size_t nt = 0;
    is >> e.layer >> e.expert >> nt;
    e.tensors.resize(nt);
    for (TensorInfo& t : e.tensors) is >> t.name >> t.rows >> t.cols >> t.adam;
  }
  return out;
}

// Every rank's expert manifest on every rank (one broadcast per rank), after agreeing that each
// rank's own entries are well formed and that no (layer, id) is held twice. Collective.
std::vector<std::vector<ExpertInfo>> gather_manifests(const std::vector<TensorEntry>& dense,
                                                      const std::vector<ExpertEntry>& experts,
                                                      const comm::Communicator& comm,
                                                      const char* what) {
  std::string err = check_entries(dense, "dense");
  for (const ExpertEntry& e : experts)
    if (err.empty()) err = check_entries(e.tensors, cat("expert ", e.layer, "/", e.expert));
  comm.agree(err, ErrorKind::kInternal, what);

  std::vector<std::vector<ExpertInfo>> all(static_cast<size_t>(comm.size()));
  const std::string mine = encode(experts);
  for (int r = 0; r < comm.size(); ++r) {
    std::string s = r == comm.rank() ? mine : std::string();
    comm.broadcast(s, r, what);
    all[static_cast<size_t>(r)] = decode(s);
  }
  std::map<std::pair<int, int>, int> holder;
  for (int r = 0; r < comm.size() && err.empty(); ++r)
    for (const ExpertInfo& e : all[static_cast<size_t>(r)]) {
      auto [it, fresh] = holder.emplace(std::make_pair(e.layer, e.expert), r);
      if (!fresh) {
        err = cat("expert ", e.expert, " of layer ", e.layer, " is held by ranks ", it->second,
                  " and ", r, "; each expert must have exactly one owner");
        break;
      }
    }
  // Every rank computed the same verdict; agree() makes them throw the same error.
  comm.agree(comm.rank() == 0 ? err : std::string(), ErrorKind::kInternal, what);
  return all;
}

// -- HDF5 tensors ----------------------------------------------------------------------------

void write_matrix(h5::File& f, const std::string& path, const float* data, int64_t rows,
                  int64_t cols, const int64_t* step) {
  f.make_groups(path.substr(0, path.rfind('/')));
  hsize_t dims[2] = {static_cast<hsize_t>(rows), static_cast<hsize_t>(cols)};
  Handle space(H5Screate_simple(2, dims, nullptr));
  Handle dset(H5Dcreate2(f.id(), path.c_str(), H5T_IEEE_F32LE, space.id(), H5P_DEFAULT, H5P_DEFAULT,
                         H5P_DEFAULT));
  if (!dset.valid()) fail(f.path(), cat("cannot create dataset '", path, "'"));
  if (rows * cols > 0 &&
      H5Dwrite(dset.id(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
    fail(f.path(), cat("cannot write dataset '", path, "'"));
  dset.reset();
  if (step) f.set_attr("step", *step, path);
}

std::vector<float> pack(ConstView v) {
  std::vector<float> out(static_cast<size_t>(v.size()));
  for (int64_t i = 0; i < v.rows; ++i) std::copy(v.row(i), v.row(i) + v.cols, &out[i * v.cols]);
  return out;
}

void write_view(h5::File& f, const std::string& path, View v, const int64_t* step) {
  if (v.contiguous()) {
    write_matrix(f, path, v.data, v.rows, v.cols, step);
  } else {
    std::vector<float> buf = pack(v);
    write_matrix(f, path, buf.data(), v.rows, v.cols, step);
  }
}

// Reads dataset `path` (tensor `name`, for messages) into v; shapes must match.
void read_view(const h5::File& f, const std::string& path, const std::string& name, View v,
               int64_t* step) {
  if (!f.exists(path)) fail(f.path(), cat("missing tensor '", name, "' (", path, ")"));
  Handle dset(H5Dopen2(f.id(), path.c_str(), H5P_DEFAULT));
  if (!dset.valid()) fail(f.path(), cat("'", path, "' is not a dataset"));
  Handle space(H5Dget_space(dset.id()));
  hsize_t dims[2] = {0, 0};
  const int nd = H5Sget_simple_extent_ndims(space.id());
  if (nd != 2) fail(f.path(), cat("tensor '", name, "' has ", nd, " dimensions, expected 2"));
  H5Sget_simple_extent_dims(space.id(), dims, nullptr);
  const auto rows = static_cast<int64_t>(dims[0]), cols = static_cast<int64_t>(dims[1]);
  if (rows != v.rows || cols != v.cols)
    fail(f.path(), cat("tensor '", name, "' has shape ", shape_str(rows, cols),
                       " in the checkpoint, the model expects ", shape_str(v.rows, v.cols)));
  if (v.size() > 0) {
    std::vector<float> buf;
    float* dst = v.data;
    if (!v.contiguous()) {
      buf.resize(static_cast<size_t>(v.size()));
      dst = buf.data();
    }
    if (H5Dread(dset.id(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, dst) < 0)
      fail(f.path(), cat("cannot read tensor '", name, "' (corrupt or truncated file?)"));
    if (!v.contiguous())
      for (int64_t i = 0; i < v.rows; ++i)
        std::copy(&buf[i * v.cols], &buf[i * v.cols] + v.cols, v.row(i));
  }
  if (step) {
    dset.reset();
    *step = f.has_attr("step", path) ? f.attr_int("step", path) : 0;
  }
}

void write_u64(h5::File& f, const std::string& path, const std::vector<uint64_t>& words) {
  hsize_t dims[1] = {words.size()};
  Handle space(H5Screate_simple(1, dims, nullptr));
  Handle dset(H5Dcreate2(f.id(), path.c_str(), H5T_STD_U64LE, space.id(), H5P_DEFAULT, H5P_DEFAULT,
                         H5P_DEFAULT));
  if (!dset.valid() ||
      H5Dwrite(dset.id(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, words.data()) < 0)
    fail(f.path(), cat("cannot write dataset '", path, "'"));
}

std::vector<uint64_t> read_u64(const h5::File& f, const std::string& path) {
  Handle dset(H5Dopen2(f.id(), path.c_str(), H5P_DEFAULT));
  Handle space(H5Dget_space(dset.id()));
  const hssize_t n = H5Sget_simple_extent_npoints(space.id());
  if (!dset.valid() || n < 0) fail(f.path(), cat("cannot read dataset '", path, "'"));
  std::vector<uint64_t> words(static_cast<size_t>(n));
  if (n > 0 &&
      H5Dread(dset.id(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, words.data()) < 0)
    fail(f.path(), cat("cannot read dataset '", path, "'"));
  return words;
}

// One 1-D dataset of the /state group: int64 or float64 [n].
template <typename T>
void write_state_array(h5::File& f, const std::string& name, const std::vector<T>& data) {
  const bool is_int = std::is_integral_v<T>;
  const std::string path = cat("/state/", name);
  if (name.empty() || name.find('/') != std::string::npos)
    fail(f.path(), cat("state name '", name, "' must be non-empty and contain no '/'"));
  hsize_t dims[1] = {data.size()};
  Handle space(H5Screate_simple(1, dims, nullptr));
  Handle dset(H5Dcreate2(f.id(), path.c_str(), is_int ? H5T_STD_I64LE : H5T_IEEE_F64LE, space.id(),
                         H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  if (!dset.valid() ||
      (!data.empty() && H5Dwrite(dset.id(), is_int ? H5T_NATIVE_INT64 : H5T_NATIVE_DOUBLE, H5S_ALL,
                                 H5S_ALL, H5P_DEFAULT, data.data()) < 0))
    fail(f.path(), cat("cannot write dataset '", path, "'"));
}

void write_state(h5::File& f, const StateArrays& state) {
  if (state.empty()) return;
  f.make_groups("/state");
  for (const auto& [name, v] : state.ints) write_state_array(f, name, v);
  for (const auto& [name, v] : state.reals) write_state_array(f, name, v);
}

// Reads every dataset of /state (a flat group) by its element class.
StateArrays read_state_group(const h5::File& f) {
  StateArrays out;
  if (!f.exists("/state")) return out;
  Handle group(H5Gopen2(f.id(), "/state", H5P_DEFAULT));
  std::vector<std::string> names;
  auto collect = [](hid_t, const char* name, const H5L_info_t*, void* op) -> herr_t {
    static_cast<std::vector<std::string>*>(op)->push_back(name);
    return 0;
  };
  if (!group.valid() ||
      H5Literate(group.id(), H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &names) < 0)
    fail(f.path(), "cannot list the group '/state'");
  for (const std::string& name : names) {
    const std::string path = "/state/" + name;
    Handle dset(H5Dopen2(f.id(), path.c_str(), H5P_DEFAULT));
    if (!dset.valid()) fail(f.path(), cat("'", path, "' is not a dataset"));
    Handle space(H5Dget_space(dset.id()));
    Handle type(H5Dget_type(dset.id()));
    const H5T_class_t cls = H5Tget_class(type.id());
    const hssize_t n = H5Sget_simple_extent_npoints(space.id());
    if (H5Sget_simple_extent_ndims(space.id()) != 1 || n < 0 ||
        (cls != H5T_INTEGER && cls != H5T_FLOAT))
      fail(f.path(), cat("'", path, "' is not a 1-D int64 or float64 dataset"));
    herr_t rc = 0;
    if (cls == H5T_INTEGER) {
      std::vector<int64_t>& v = out.ints[name];
      v.resize(static_cast<size_t>(n));
      if (n > 0) rc = H5Dread(dset.id(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    } else {
      std::vector<double>& v = out.reals[name];
      v.resize(static_cast<size_t>(n));
      if (n > 0)
        rc = H5Dread(dset.id(), H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    }
    if (rc < 0) fail(f.path(), cat("cannot read dataset '", path, "'"));
  }
  return out;
}

// The three datasets of one tensor: value, Adam m, Adam v.
std::string value_path(const std::string& group, const std::string& name) {
  return cat("/model", group, "/", name);
}
std::string m_path(const std::string& group, const std::string& name) {
  return cat("/optim/m", group, "/", name);
}
std::string v_path(const std::string& group, const std::string& name) {
  return cat("/optim/v", group, "/", name);
}

// -- files and directories -------------------------------------------------------------------

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, cat("cannot open for fsync: ", std::strerror(errno)));
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  if (rc != 0) fail(path, cat("fsync failed: ", std::strerror(saved)));
}

void write_text_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) fail(tmp, "cannot write");
  }
  fsync_path(tmp);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail(path, cat("cannot rename ", tmp, " into place: ", ec.message()));
}

// Step of a directory named step-<digits>, or -1.
int64_t parse_step_dir(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() == 5) return -1;
  for (size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoll(name.substr(5));
}

// Deletes complete checkpoints beyond the newest `keep` (never the one `latest` names) and
// leftovers of interrupted saves.
void prune(const std::string& dir, int keep, const std::string& keep_name) {
  std::vector<std::pair<int64_t, fs::path>> steps;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (!entry.is_directory()) continue;
    const std::string name = entry.path().filename().string();
    const int64_t s = parse_step_dir(name);
    if (s >= 0) steps.emplace_back(s, entry.path());
  }
  std::sort(steps.begin(), steps.end(), [](const auto& a, const auto& b) { return a > b; });
  for (size_t i = static_cast<size_t>(std::max(keep, 1)); i < steps.size(); ++i) {
    if (steps[i].second.filename() == keep_name) continue;
    std::error_code ec;
    fs::remove_all(steps[i].second, ec);
  }
}

void remove_leftovers(const std::string& dir) {
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(".tmp-step-", 0) == 0 || name.rfind(".old-step-", 0) == 0) {
      std::error_code ec;
      fs::remove_all(entry.path(), ec);
    }
  }
}

// Sends one view to rank 0 (packed, in int-sized chunks).
void send_view(View v, const comm::Communicator& comm) {
  std::vector<float> buf = pack(v);
  for (int64_t off = 0; off < v.size(); off += comm::kMaxMpiCount) {
    const int n = static_cast<int>(std::min(comm::kMaxMpiCount, v.size() - off));
    MOE_MPI_CHECK(MPI_Send(buf.data() + off, n, MPI_FLOAT, 0, kTag, comm.raw()),
                  "checkpoint save: send tensor");
  }
}

void recv_tensor(std::vector<float>& buf, int64_t n, int from, const comm::Communicator& comm) {
  buf.resize(static_cast<size_t>(n));
  for (int64_t off = 0; off < n; off += comm::kMaxMpiCount) {
    const int c = static_cast<int>(std::min(comm::kMaxMpiCount, n - off));
    MOE_MPI_CHECK(
        MPI_Recv(buf.data() + off, c, MPI_FLOAT, from, kTag, comm.raw(), MPI_STATUS_IGNORE),
        "checkpoint save: receive tensor");
  }
}

// The entries that are not replicas.
std::vector<ExpertEntry> owned(const std::vector<ExpertEntry>& experts) {
  std::vector<ExpertEntry> out;
  for (const ExpertEntry& e : experts)
    if (!e.replica) out.push_back(e);
  return out;
}

// Runs f unless an error was already recorded; records the first error.
template <typename F>
void attempt(std::string& err, F&& f) {
  if (!err.empty()) return;
  try {
    f();
  } catch (const std::exception& e) {
    err = e.what();
    if (err.empty()) err = "unknown error";
  }
}

}  // namespace

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

std::string latest(const std::string& dir) {
  std::ifstream in(fs::path(dir) / "latest");
  if (!in) return "";
  std::string name;
  std::getline(in, name);
  if (name.empty()) return "";
  return (fs::path(dir) / name).string();
}

std::string save(const std::string& dir, const std::vector<TensorEntry>& dense,
                 const std::vector<ExpertEntry>& given, const Metadata& meta,
                 const comm::Communicator& comm, const SaveOptions& options) {
  const std::vector<ExpertEntry> experts = owned(given);  // each expert once
  const auto manifests = gather_manifests(dense, experts, comm, "checkpoint save");
  const std::string name = step_dir_name(meta.step);
  const std::string final_dir = (fs::path(dir) / name).string();
  const std::string tmp_dir = (fs::path(dir) / (".tmp-" + name)).string();
  const std::string file_path = (fs::path(tmp_dir) / kFileName).string();
  auto stage = [&](const char* s) {
    if (options.on_stage) options.on_stage(s);
  };

  std::string err;  // rank 0's first failure; it keeps draining peers' sends after one
  std::optional<h5::File> file;
  auto write_expert = [&](const ExpertInfo& info, const std::vector<View>& values,
                          const std::vector<View>& ms, const std::vector<View>& vs,
                          const std::vector<int64_t>& steps) {
    const std::string group = expert_group(info.layer, info.expert);
    for (size_t t = 0; t < info.tensors.size(); ++t) {
      const std::string& tn = info.tensors[t].name;
      write_view(*file, value_path(group, tn), values[t], nullptr);
      if (info.tensors[t].adam) {
        write_view(*file, m_path(group, tn), ms[t], &steps[t]);
        write_view(*file, v_path(group, tn), vs[t], &steps[t]);
      }
    }
  };

  if (comm.rank() == 0) {
    attempt(err, [&] {
      fs::create_directories(dir);
      remove_leftovers(dir);
      fs::create_directories(tmp_dir);
      file = h5::File::create(file_path);
      file->set_attr("format_version", kFormatVersion);
      file->set_attr("step", meta.step);
      file->set_attr("seed", meta.seed);
      file->set_attr("data_position", meta.data_position);
      file->set_attr("world_size", static_cast<int64_t>(comm.size()));
      file->set_attr("n_experts", [&] {
        int64_t n = 0;
        for (const auto& m : manifests) n += static_cast<int64_t>(m.size());
        return n;
      }());
      file->set_attr("config", meta.config);
      if (!meta.rng_state.empty()) write_u64(*file, "/rng_state", meta.rng_state);
      write_state(*file, meta.state);
      file->make_groups("/model/dense");
      file->make_groups("/model/experts");
      stage("file_created");
      for (const TensorEntry& t : dense) {
        write_view(*file, value_path("/dense", t.name), t.value, nullptr);
        if (has(t.adam_m)) {
          const int64_t step = t.adam_step ? *t.adam_step : 0;
          write_view(*file, m_path("/dense", t.name), t.adam_m, &step);
          write_view(*file, v_path("/dense", t.name), t.adam_v, &step);
        }
      }
      stage("dense_written");
      for (size_t e = 0; e < experts.size(); ++e) {
        std::vector<View> values, ms, vs;
        std::vector<int64_t> steps;
        for (const TensorEntry& t : experts[e].tensors) {
          values.push_back(t.value);
          ms.push_back(t.adam_m);
          vs.push_back(t.adam_v);
          steps.push_back(t.adam_step ? *t.adam_step : 0);
        }
        write_expert(manifests[0][e], values, ms, vs, steps);
      }
    });
    // Other ranks' experts, tensor by tensor, in rank order; received even after a failure.
    std::vector<float> value, m, v;
    for (int r = 1; r < comm.size(); ++r)
      for (const ExpertInfo& info : manifests[static_cast<size_t>(r)]) {
        std::vector<int64_t> steps(info.tensors.size(), 0);
        MOE_MPI_CHECK(MPI_Recv(steps.data(), static_cast<int>(steps.size()), MPI_INT64_T, r, kTag,
                               comm.raw(), MPI_STATUS_IGNORE),
                      "checkpoint save: receive steps");
        for (size_t t = 0; t < info.tensors.size(); ++t) {
          const TensorInfo& ti = info.tensors[t];
          const int64_t n = ti.rows * ti.cols;
          recv_tensor(value, n, r, comm);
          if (ti.adam) {
            recv_tensor(m, n, r, comm);
            recv_tensor(v, n, r, comm);
          }
          attempt(err, [&] {
            ExpertInfo one{info.layer, info.expert, {ti}};
            write_expert(one, {View(value.data(), ti.rows, ti.cols)},
                         {View(m.data(), ti.rows, ti.cols)}, {View(v.data(), ti.rows, ti.cols)},
                         {steps[t]});
          });
        }
      }
    attempt(err, [&] {
      stage("experts_written");
      file.reset();  // close: HDF5 flushes its metadata
      fsync_path(file_path);
      fsync_path(tmp_dir);
      stage("synced");
      if (fs::exists(final_dir)) {
        // The same step saved again (a resumed run): swap the old copy out first.
        const std::string old = (fs::path(dir) / (".old-" + name)).string();
        fs::remove_all(old);
        fs::rename(final_dir, old);
        fs::rename(tmp_dir, final_dir);
        fs::remove_all(old);
      } else {
        fs::rename(tmp_dir, final_dir);
      }
      fsync_path(dir);
      stage("renamed");
      write_text_atomically((fs::path(dir) / "latest").string(), name + "\n");
      fsync_path(dir);
      prune(dir, options.keep, name);
    });
    if (!err.empty()) {
      file.reset();
      std::error_code ec;
      fs::remove_all(tmp_dir, ec);
    }
  } else {
    for (const ExpertEntry& e : experts) {
      std::vector<int64_t> steps;
      for (const TensorEntry& t : e.tensors) steps.push_back(t.adam_step ? *t.adam_step : 0);
      MOE_MPI_CHECK(
          MPI_Send(steps.data(), static_cast<int>(steps.size()), MPI_INT64_T, 0, kTag, comm.raw()),
          "checkpoint save: send steps");
      for (const TensorEntry& t : e.tensors) {
        send_view(t.value, comm);
        if (has(t.adam_m)) {
          send_view(t.adam_m, comm);
          send_view(t.adam_v, comm);
        }
      }
    }
  }
  comm.agree(err.empty() ? err : cat("checkpoint save failed, previous checkpoint kept: ", err),
             ErrorKind::kData, "checkpoint save");
  return final_dir;
}

namespace {

// The model.h5 of a checkpoint root (following `latest`) or of one step directory.
std::string checkpoint_file(const std::string& path) {
  if (fs::exists(fs::path(path) / kFileName)) return (fs::path(path) / kFileName).string();
  if (fs::exists(fs::path(path) / "latest")) {
    const std::string dir = latest(path);
    if (dir.empty()) fail((fs::path(path) / "latest").string(), "empty checkpoint pointer");
    std::string file_path = (fs::path(dir) / kFileName).string();
    if (!fs::exists(file_path)) fail(file_path, "no such file (named by 'latest')");
    return file_path;
  }
  if (fs::exists(path))
    fail(path, cat("not a checkpoint: neither ", kFileName, " nor 'latest' in it"));
  fail(path, "no such checkpoint directory");
}

// Opens a checkpoint file and checks its format version.
h5::File open_checkpoint(const std::string& file_path) {
  h5::File f = h5::File::open(file_path);
  if (!f.has_attr("format_version"))
    fail(file_path, "not a checkpoint (no format_version attribute)");
  const int64_t version = f.attr_int("format_version");
  if (version != kFormatVersion)
    fail(file_path,
         cat("checkpoint format_version ", version, ", this build reads ", kFormatVersion));
  return f;
}

}  // namespace

std::string read_config(const std::string& path) {
  return open_checkpoint(checkpoint_file(path)).attr_string("config");
}

StateArrays read_state(const std::string& path) {
  return read_state_group(open_checkpoint(checkpoint_file(path)));
}

Metadata load(const std::string& path, const std::vector<TensorEntry>& dense,
              const std::vector<ExpertEntry>& experts, const comm::Communicator& comm) {
  // Replicas are read like their owners but are not holders (not in the manifests).
  const auto manifests = gather_manifests(dense, owned(experts), comm, "checkpoint load");
  int64_t requested = 0;
  for (const auto& m : manifests) requested += static_cast<int64_t>(m.size());

  Metadata meta;
  std::string err;
  attempt(err, [&] {
    const std::string file_path = checkpoint_file(path);
    const h5::File f = open_checkpoint(file_path);
    meta.step = f.attr_int("step");
    meta.seed = f.attr_int("seed");
    meta.data_position = f.attr_int("data_position");
    meta.world_size = f.attr_int("world_size");
    meta.config = f.attr_string("config");
    if (f.exists("/rng_state")) meta.rng_state = read_u64(f, "/rng_state");
    meta.state = read_state_group(f);
    const int64_t saved = f.attr_int("n_experts");
    if (saved != requested)
      fail(file_path, cat("checkpoint holds ", saved, " experts, the ranks load ", requested,
                          " (the expert placement must cover every expert once)"));

    auto read_entry = [&](const std::string& group, const std::string& label,
                          const TensorEntry& t) {
      read_view(f, value_path(group, t.name), label + t.name, t.value, nullptr);
      if (has(t.adam_m)) {
        int64_t step = 0;
        read_view(f, m_path(group, t.name), label + t.name + " (adam m)", t.adam_m, &step);
        read_view(f, v_path(group, t.name), label + t.name + " (adam v)", t.adam_v, nullptr);
        if (t.adam_step) *t.adam_step = step;
      }
    };
    for (const TensorEntry& t : dense) read_entry("/dense", "", t);
    for (const ExpertEntry& e : experts) {
      const std::string group = expert_group(e.layer, e.expert);
      if (!f.exists("/model" + group))
        fail(file_path,
             cat("missing expert ", e.expert, " of layer ", e.layer, " (/model", group, ")"));
      for (const TensorEntry& t : e.tensors)
        read_entry(group, cat("layer ", e.layer, " expert ", e.expert, " "), t);
    }
  });
  comm.agree(err, ErrorKind::kData, "checkpoint load");
  return meta;
}

}  // namespace moe::checkpoint
