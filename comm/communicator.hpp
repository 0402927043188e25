// File: communicator.hpp — RAII MPI communicators, typed collectives, collective error agreement.
//
// Contract (as for every collective in this project): all functions marked "collective" must be
// called by every rank of the communicator, in the same order. Communicators use
// MPI_ERRORS_RETURN and every MPI call goes through MOE_MPI_CHECK, which throws an Error of kind
// kComm with MPI's error string and the operation's name; the program's top level then aborts
// the whole job (moe::fatal), so a failure never leaves a peer waiting.
//
// Nothing in model/ includes <mpi.h>: layers receive a Communicator& and call its methods.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/error.hpp"

#define MOE_MPI_CHECK(call, what)                                                       \
  do {                                                                                  \
    int moe_rc_ = (call);                                                               \
    if (moe_rc_ != MPI_SUCCESS) ::moe::comm::throw_mpi_error(moe_rc_, what, MOE_WHERE); \
  } while (0)

namespace moe::comm {

[[noreturn]] void throw_mpi_error(int rc, const std::string& what, const std::string& where);

// Initialises MPI (with MPI_THREAD_FUNNELED) for the life of the object; finalises on exit.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
};

template <typename T>
MPI_Datatype mpi_type();
template <>
inline MPI_Datatype mpi_type<float>() {
  return MPI_FLOAT;
}
template <>
inline MPI_Datatype mpi_type<double>() {
  return MPI_DOUBLE;
}
template <>
inline MPI_Datatype mpi_type<int>() {
  return MPI_INT;
}
template <>
inline MPI_Datatype mpi_type<int64_t>() {
  return MPI_INT64_T;
}
template <>
inline MPI_Datatype mpi_type<uint64_t>() {
  return MPI_UINT64_T;
}
template <>
inline MPI_Datatype mpi_type<char>() {
  return MPI_CHAR;
}

class Communicator {
 public:
  // A duplicate of MPI_COMM_WORLD with MPI_ERRORS_RETURN. Collective.
  static Communicator world();
  // The ranks on this node (MPI_COMM_TYPE_SHARED). Collective.
  Communicator split_node() const;
  // Ranks with the same color, ordered by key. Collective.
  Communicator split(int color, int key) const;

  Communicator() = default;
  ~Communicator();
  Communicator(Communicator&& other) noexcept;
  Communicator& operator=(Communicator&& other) noexcept;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm raw() const { return comm_; }

  // Collective.
  void barrier(const char* what = "barrier") const;

  // In-place sum / max / min over ranks. Collective.
  template <typename T>
  void allreduce_sum(T* data, int64_t n, const char* what = "allreduce") const {
    allreduce(data, n, mpi_type<T>(), MPI_SUM, what);
  }
  template <typename T>
  void allreduce_max(T* data, int64_t n, const char* what = "allreduce") const {
    allreduce(data, n, mpi_type<T>(), MPI_MAX, what);
  }
  template <typename T>
  void allreduce_min(T* data, int64_t n, const char* what = "allreduce") const {
    allreduce(data, n, mpi_type<T>(), MPI_MIN, what);
  }
  template <typename T>
  T sum(T v, const char* what = "allreduce") const {
    allreduce_sum(&v, 1, what);
    return v;
  }
  template <typename T>
  T max(T v, const char* what = "allreduce") const {
    allreduce_max(&v, 1, what);
    return v;
  }
  template <typename T>
  void broadcast(T* data, int64_t n, int root, const char* what = "broadcast") const {
    bcast(data, n, mpi_type<T>(), root, what);
  }
  // Broadcasts a string from root. Collective.
  void broadcast(std::string& s, int root, const char* what = "broadcast") const;

  // True on every rank if `flag` is true on any rank (MPI_LOR). Collective.
  bool any(bool flag, const char* what = "any") const;

  // Collective error agreement: if `error` is non-empty on any rank, every rank throws the same
  // Error(kind, "rank R: <error>") for the lowest such rank R. Use it where every rank can check
  // (config, file headers, world size against experts) so all ranks fail alike, before the
  // first collective that could hang.
  void agree(const std::string& error, ErrorKind kind, const char* what = "agree") const;

  // Gathers one value from every rank on every rank. Collective.
  template <typename T>
  std::vector<T> allgather(T v, const char* what = "allgather") const {
    std::vector<T> out(static_cast<size_t>(size_));
    MOE_MPI_CHECK(MPI_Allgather(&v, 1, mpi_type<T>(), out.data(), 1, mpi_type<T>(), comm_), what);
    return out;
  }

  // Concatenates every rank's n values on root, in rank order; counts[r] (read on root only)
  // is rank r's n, recv holds their sum. Collective.
  template <typename T>
  void gatherv(const T* send, int64_t n, T* recv, const std::vector<int64_t>& counts, int root,
               const char* what = "gatherv") const {
    std::vector<int> cnt, off;
    if (rank_ == root) {
      int64_t at = 0;
      for (int64_t c : counts) {
        MOE_CHECK(at + c <= int64_t{2147483647}, what, ": gatherv of more than 2^31 - 1 values");
        cnt.push_back(static_cast<int>(c));
        off.push_back(static_cast<int>(at));
        at += c;
      }
    }
    MOE_MPI_CHECK(MPI_Gatherv(send, static_cast<int>(n), mpi_type<T>(), recv, cnt.data(),
                              off.data(), mpi_type<T>(), root, comm_),
                  what);
  }

 private:
  explicit Communicator(MPI_Comm comm);
  void allreduce(void* data, int64_t n, MPI_Datatype type, MPI_Op op, const char* what) const;
  void bcast(void* data, int64_t n, MPI_Datatype type, int root, const char* what) const;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

// Largest element count passed to one MPI call: counts are `int`.
constexpr int64_t kMaxMpiCount = 2147483647;

// Which ranks of a communicator share a node. N = nodes, L = ranks per node.
// Nodes come from MPI_COMM_TYPE_SHARED (numbered by their lowest rank; a rank's local index is
// its order by rank within the node), or, with the override ranks_per_node = L > 0
// (`comm.ranks_per_node`), from consecutive blocks of L ranks: rank r is on node r / L with local
// index r % L, which forces a multi-node layout on one machine.
struct NodeLayout {
  int n_nodes = 1;
  int ranks_per_node = 1;  // L when every node holds the same number of ranks, else 0
  bool forced = false;     // from the ranks_per_node override, not from MPI
  std::vector<int> node;   // [P] node of each rank
  std::vector<int> local;  // [P] index of each rank within its node
  bool uniform() const { return ranks_per_node > 0; }
  // "2 nodes x 2 ranks (comm.ranks_per_node)" or "3 nodes, uneven: 2 1 1 ranks"
  std::string describe() const;
};

// Collective over comm (it splits off the node communicator unless ranks_per_node > 0).
// ranks_per_node < 0, or > 0 without dividing comm.size(), is an Error(kConfig) on every rank.
NodeLayout node_layout(const Communicator& comm, int ranks_per_node);
// The same check without communication, for configuration validation: "" or the message.
std::string check_ranks_per_node(int ranks_per_node, int n_ranks);

}  // namespace moe::comm
