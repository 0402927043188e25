// File: h5.hpp — a small RAII layer over the HDF5 C API.
//
// Every failure throws moe::Error(kData) naming the file and the object, never an HDF5 error
// stack dump: HDF5's automatic error printing is switched off on first use.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

namespace moe::h5 {

// One owned HDF5 identifier (file, group, dataset, dataspace, datatype or attribute).
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : id_(o.id_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  hid_t id() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset();

 private:
  hid_t id_ = H5I_INVALID_HID;
};

// Integer element types of token datasets.
enum class IntType { kU8, kU16, kI32, kOther };
const char* int_type_name(IntType t);
// The smallest unsigned type that holds ids [0, vocab_size).
IntType int_type_for_vocab(int64_t vocab_size);
hid_t native_type(IntType t);

class File {
 public:
  // Opens an existing file read-only. Errors: missing file, not an HDF5 file.
  static File open(const std::string& path);
  // Creates (truncates) a file for writing.
  static File create(const std::string& path);

  const std::string& path() const { return path_; }
  hid_t id() const { return file_.id(); }
  bool exists(const std::string& object) const;

  // Attributes on the root group (or on `object`).
  void set_attr(const std::string& name, int64_t v, const std::string& object = "/");
  void set_attr(const std::string& name, double v, const std::string& object = "/");
  void set_attr(const std::string& name, const std::string& v, const std::string& object = "/");
  bool has_attr(const std::string& name, const std::string& object = "/") const;
  int64_t attr_int(const std::string& name, const std::string& object = "/") const;
  double attr_float(const std::string& name, const std::string& object = "/") const;
  std::string attr_string(const std::string& name, const std::string& object = "/") const;

  // Creates the groups on the way to `path` ("/a/b/c" creates /a and /a/b).
  void make_groups(const std::string& path);
  // A contiguous 1-D dataset of `type` holding `n` elements from `data` (native layout).
  void write_1d(const std::string& path, IntType type, const void* data, int64_t n);
  // A 1-D uint8 dataset from bytes.
  void write_bytes(const std::string& path, const std::string& bytes);
  std::string read_bytes(const std::string& path) const;

 private:
  std::string path_;
  Handle file_;
};

// A 1-D integer dataset opened for random reads of contiguous windows.
class IntDataset {
 public:
  IntDataset() = default;
  // Errors name the file and dataset: missing dataset, not 1-D, not an integer type we read.
  IntDataset(const File& file, const std::string& path);
  int64_t size() const { return size_; }
  IntType type() const { return type_; }
  // Reads [offset, offset + n) in the file's own type and widens to int32 (cheaper than asking
  // HDF5 to convert). out has n elements.
  void read(int64_t offset, int64_t n, int32_t* out) const;

 private:
  std::string file_path_, path_;
  Handle dset_, space_;
  int64_t size_ = 0;
  IntType type_ = IntType::kOther;
  mutable std::vector<uint8_t> raw_;  // staging for narrow types
};

}  // namespace moe::h5
