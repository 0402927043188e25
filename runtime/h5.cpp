#include "runtime/h5.hpp"

#include <cstring>
#include <filesystem>

#include "runtime/error.hpp"

namespace moe::h5 {

namespace {

void quiet() {
  static bool done = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw Error(ErrorKind::kData, cat(file, ": ", what));
}

Handle open_object(hid_t file, const std::string& object, const std::string& file_path) {
  hid_t id = H5Oopen(file, object.c_str(), H5P_DEFAULT);
  if (id < 0) fail(file_path, cat("no object '", object, "'"));
  return Handle(id);
}

}  // namespace

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_;
    o.id_ = H5I_INVALID_HID;
  }
  return *this;
}

void Handle::reset() {
  if (id_ >= 0) {
    switch (H5Iget_type(id_)) {
      case H5I_FILE:
        H5Fclose(id_);
        break;
      case H5I_GROUP:
        H5Gclose(id_);
        break;
      case H5I_DATASET:
        H5Dclose(id_);
        break;
      case H5I_DATASPACE:
        H5Sclose(id_);
        break;
      case H5I_DATATYPE:
        H5Tclose(id_);
        break;
      case H5I_ATTR:
        H5Aclose(id_);
        break;
      default:
        H5Idec_ref(id_);
        break;
    }
  }
  id_ = H5I_INVALID_HID;
}

const char* int_type_name(IntType t) {
  switch (t) {
    case IntType::kU8:
      return "uint8";
    case IntType::kU16:
      return "uint16";
    case IntType::kI32:
      return "int32";
    case IntType::kOther:
      return "other";
  }
  return "?";
}

IntType int_type_for_vocab(int64_t vocab_size) {
  if (vocab_size <= 256) return IntType::kU8;
  if (vocab_size <= 65536) return IntType::kU16;
  return IntType::kI32;
}

hid_t native_type(IntType t) {
  switch (t) {
    case IntType::kU8:
      return H5T_NATIVE_UINT8;
    case IntType::kU16:
      return H5T_NATIVE_UINT16;
    case IntType::kI32:
      return H5T_NATIVE_INT32;
    case IntType::kOther:
      break;
  }
  throw Error(ErrorKind::kInternal, "h5: no native type for 'other'");
}

File File::open(const std::string& path) {
  quiet();
  if (!std::filesystem::exists(path)) fail(path, "no such file");
  if (std::filesystem::is_directory(path)) fail(path, "is a directory, expected an HDF5 file");
  htri_t is = H5Fis_hdf5(path.c_str());
  if (is <= 0) fail(path, "not an HDF5 file");
  hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0) fail(path, "cannot open as HDF5 (corrupt or truncated?)");
  File f;
  f.path_ = path;
  f.file_ = Handle(id);
  return f;
}

File File::create(const std::string& path) {
  quiet();
  hid_t id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (id < 0) fail(path, "cannot create file (does the directory exist and is it writable?)");
  File f;
  f.path_ = path;
  f.file_ = Handle(id);
  return f;
}

bool File::exists(const std::string& object) const {
  // Check each prefix: H5Lexists fails on a missing intermediate group.
  std::string prefix;
  size_t pos = 1;
  while (pos != std::string::npos) {
    pos = object.find('/', pos);
    prefix = object.substr(0, pos);
    if (prefix.empty() || prefix == "/") {
      if (pos != std::string::npos) ++pos;
      continue;
    }
    if (H5Lexists(file_.id(), prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (pos != std::string::npos) ++pos;
  }
  return true;
}

void File::make_groups(const std::string& path) {
  size_t pos = 1;
  while ((pos = path.find('/', pos)) != std::string::npos) {
    std::string g = path.substr(0, pos);
    if (H5Lexists(file_.id(), g.c_str(), H5P_DEFAULT) <= 0) {
      Handle h(H5Gcreate2(file_.id(), g.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
      if (!h.valid()) fail(path_, cat("cannot create group '", g, "'"));
    }
    ++pos;
  }
  if (H5Lexists(file_.id(), path.c_str(), H5P_DEFAULT) <= 0) {
    Handle h(H5Gcreate2(file_.id(), path.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    if (!h.valid()) fail(path_, cat("cannot create group '", path, "'"));
  }
}

namespace {

void write_attr(hid_t file, const std::string& file_path, const std::string& object,
                const std::string& name, hid_t type, const void* value) {
  Handle obj = open_object(file, object, file_path);
  if (H5Aexists(obj.id(), name.c_str()) > 0) H5Adelete(obj.id(), name.c_str());
  Handle space(H5Screate(H5S_SCALAR));
  Handle attr(H5Acreate2(obj.id(), name.c_str(), type, space.id(), H5P_DEFAULT, H5P_DEFAULT));
  if (!attr.valid() || H5Awrite(attr.id(), type, value) < 0)
    fail(file_path, cat("cannot write attribute '", name, "' on '", object, "'"));
}

Handle read_attr(hid_t file, const std::string& file_path, const std::string& object,
                 const std::string& name) {
  Handle obj = open_object(file, object, file_path);
  if (H5Aexists(obj.id(), name.c_str()) <= 0)
    fail(file_path, cat("missing attribute '", name, "' on '", object, "'"));
  return Handle(H5Aopen(obj.id(), name.c_str(), H5P_DEFAULT));
}

}  // namespace

void File::set_attr(const std::string& name, int64_t v, const std::string& object) {
  write_attr(file_.id(), path_, object, name, H5T_NATIVE_INT64, &v);
}

void File::set_attr(const std::string& name, double v, const std::string& object) {
  write_attr(file_.id(), path_, object, name, H5T_NATIVE_DOUBLE, &v);
}

void File::set_attr(const std::string& name, const std::string& v, const std::string& object) {
  // Variable-length UTF-8 strings: what h5py and h5dump show as plain strings.
  Handle type(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.id(), H5T_VARIABLE);
  H5Tset_cset(type.id(), H5T_CSET_UTF8);
  const char* p = v.c_str();
  write_attr(file_.id(), path_, object, name, type.id(), &p);
}

bool File::has_attr(const std::string& name, const std::string& object) const {
  if (!exists(object) && object != "/") return false;
  Handle obj = open_object(file_.id(), object, path_);
  return H5Aexists(obj.id(), name.c_str()) > 0;
}

int64_t File::attr_int(const std::string& name, const std::string& object) const {
  Handle a = read_attr(file_.id(), path_, object, name);
  Handle t(H5Aget_type(a.id()));
  if (H5Tget_class(t.id()) != H5T_INTEGER)
    fail(path_, cat("attribute '", name, "' is not an integer"));
  int64_t v = 0;
  if (H5Aread(a.id(), H5T_NATIVE_INT64, &v) < 0)
    fail(path_, cat("cannot read attribute '", name, "'"));
  return v;
}

double File::attr_float(const std::string& name, const std::string& object) const {
  Handle a = read_attr(file_.id(), path_, object, name);
  double v = 0;
  if (H5Aread(a.id(), H5T_NATIVE_DOUBLE, &v) < 0)
    fail(path_, cat("cannot read attribute '", name, "'"));
  return v;
}

std::string File::attr_string(const std::string& name, const std::string& object) const {
  Handle a = read_attr(file_.id(), path_, object, name);
  Handle t(H5Aget_type(a.id()));
  if (H5Tget_class(t.id()) != H5T_STRING)
    fail(path_, cat("attribute '", name, "' is not a string"));
  if (H5Tis_variable_str(t.id()) > 0) {
    Handle mem(H5Tcopy(H5T_C_S1));
    H5Tset_size(mem.id(), H5T_VARIABLE);
    H5Tset_cset(mem.id(), H5Tget_cset(t.id()));
    char* p = nullptr;
    if (H5Aread(a.id(), mem.id(), &p) < 0) fail(path_, cat("cannot read attribute '", name, "'"));
    std::string s = p ? p : "";
    Handle space(H5Aget_space(a.id()));
    H5Dvlen_reclaim(mem.id(), space.id(), H5P_DEFAULT, &p);
    return s;
  }
  size_t n = H5Tget_size(t.id());
  std::string s(n, '\0');
  if (H5Aread(a.id(), t.id(), s.data()) < 0) fail(path_, cat("cannot read attribute '", name, "'"));
  s.resize(std::strlen(s.c_str()));
  return s;
}

void File::write_1d(const std::string& path, IntType type, const void* data, int64_t n) {
  size_t slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) make_groups(path.substr(0, slash));
  hsize_t dims[1] = {static_cast<hsize_t>(n)};
  Handle space(H5Screate_simple(1, dims, nullptr));
  // Contiguous layout: random window reads were measured 1.5-3x faster than 64Ki-token chunks.
  Handle dset(H5Dcreate2(file_.id(), path.c_str(), native_type(type), space.id(), H5P_DEFAULT,
                         H5P_DEFAULT, H5P_DEFAULT));
  if (!dset.valid()) fail(path_, cat("cannot create dataset '", path, "'"));
  if (n > 0 && H5Dwrite(dset.id(), native_type(type), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
    fail(path_, cat("cannot write dataset '", path, "'"));
}

void File::write_bytes(const std::string& path, const std::string& bytes) {
  write_1d(path, IntType::kU8, bytes.data(), static_cast<int64_t>(bytes.size()));
}

std::string File::read_bytes(const std::string& path) const {
  if (!exists(path)) fail(path_, cat("missing dataset '", path, "'"));
  Handle dset(H5Dopen2(file_.id(), path.c_str(), H5P_DEFAULT));
  Handle space(H5Dget_space(dset.id()));
  hssize_t n = H5Sget_simple_extent_npoints(space.id());
  std::string s(static_cast<size_t>(n), '\0');
  if (n > 0 && H5Dread(dset.id(), H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, s.data()) < 0)
    fail(path_, cat("cannot read dataset '", path, "'"));
  return s;
}

IntDataset::IntDataset(const File& file, const std::string& path)
    : file_path_(file.path()), path_(path) {
  if (!file.exists(path)) fail(file_path_, cat("missing dataset '", path, "'"));
  dset_ = Handle(H5Dopen2(file.id(), path.c_str(), H5P_DEFAULT));
  if (!dset_.valid()) fail(file_path_, cat("'", path, "' is not a dataset"));
  space_ = Handle(H5Dget_space(dset_.id()));
  if (H5Sget_simple_extent_ndims(space_.id()) != 1)
    fail(file_path_, cat("dataset '", path, "' must be 1-D, has ",
                         H5Sget_simple_extent_ndims(space_.id()), " dimensions"));
  hsize_t dims[1];
  H5Sget_simple_extent_dims(space_.id(), dims, nullptr);
  size_ = static_cast<int64_t>(dims[0]);
  Handle t(H5Dget_type(dset_.id()));
  if (H5Tget_class(t.id()) == H5T_INTEGER) {
    size_t bytes = H5Tget_size(t.id());
    H5T_sign_t sign = H5Tget_sign(t.id());
    if (bytes == 1 && sign == H5T_SGN_NONE)
      type_ = IntType::kU8;
    else if (bytes == 2 && sign == H5T_SGN_NONE)
      type_ = IntType::kU16;
    else if (bytes == 4 && sign == H5T_SGN_2)
      type_ = IntType::kI32;
  }
  if (type_ == IntType::kOther) {
    const char* cls = H5Tget_class(t.id()) == H5T_FLOAT ? "a floating-point" : "an unsupported";
    fail(file_path_, cat("dataset '", path, "' has ", cls, " element type (", H5Tget_size(t.id()),
                         " bytes); expected uint8, uint16 or int32 token ids"));
  }
}

void IntDataset::read(int64_t offset, int64_t n, int32_t* out) const {
  MOE_CHECK(offset >= 0 && n >= 0 && offset + n <= size_, "read [", offset, ", ", offset + n,
            ") of ", size_);
  if (n == 0) return;
  hsize_t start[1] = {static_cast<hsize_t>(offset)}, count[1] = {static_cast<hsize_t>(n)};
  Handle file_space(H5Scopy(space_.id()));
  H5Sselect_hyperslab(file_space.id(), H5S_SELECT_SET, start, nullptr, count, nullptr);
  Handle mem_space(H5Screate_simple(1, count, nullptr));
  void* dst = out;
  size_t width = type_ == IntType::kU8 ? 1 : type_ == IntType::kU16 ? 2 : 4;
  if (width != 4) {
    raw_.resize(static_cast<size_t>(n) * width);
    dst = raw_.data();
  }
  if (H5Dread(dset_.id(), native_type(type_), mem_space.id(), file_space.id(), H5P_DEFAULT, dst) <
      0)
    fail(file_path_, cat("cannot read ", n, " tokens at ", offset, " from '", path_, "'"));
  if (type_ == IntType::kU8) {
    for (int64_t i = 0; i < n; ++i) out[i] = raw_[i];
  } else if (type_ == IntType::kU16) {
    const auto* p = reinterpret_cast<const uint16_t*>(raw_.data());
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  }
}

}  // namespace moe::h5
