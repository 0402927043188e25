#include "comm/communicator.hpp"

#include <algorithm>
#include <utility>

namespace moe::comm {

void throw_mpi_error(int rc, const std::string& what, const std::string& where) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, buf, &len);
  throw Error(ErrorKind::kComm, cat(what, ": MPI error: ", std::string(buf, len)), where);
}

MpiSession::MpiSession(int* argc, char*** argv) {
  int provided = 0;
  MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  // Errors on MPI_COMM_WORLD itself come back as codes too, so fatal() can name them.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

Communicator::Communicator(MPI_Comm comm) : comm_(comm) {
  MOE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "comm set_errhandler");
  MOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_), "comm rank");
  MOE_MPI_CHECK(MPI_Comm_size(comm_, &size_), "comm size");
}

Communicator Communicator::world() {
  MPI_Comm c;
  MOE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &c), "comm dup world");
  return Communicator(c);
}

Communicator Communicator::split_node() const {
  MPI_Comm c;
  MOE_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &c),
                "comm split node");
  return Communicator(c);
}

Communicator Communicator::split(int color, int key) const {
  MPI_Comm c;
  MOE_MPI_CHECK(MPI_Comm_split(comm_, color, key, &c), "comm split");
  return Communicator(c);
}

Communicator::~Communicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

Communicator::Communicator(Communicator&& o) noexcept
    : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), rank_(o.rank_), size_(o.size_) {}

Communicator& Communicator::operator=(Communicator&& o) noexcept {
  if (this != &o) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
    comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
    rank_ = o.rank_;
    size_ = o.size_;
  }
  return *this;
}

void Communicator::barrier(const char* what) const {
  MOE_MPI_CHECK(MPI_Barrier(comm_), what);
}

void Communicator::allreduce(void* data, int64_t n, MPI_Datatype type, MPI_Op op,
                             const char* what) const {
  auto* p = static_cast<char*>(data);
  int size = 0;
  MPI_Type_size(type, &size);
  // Chunk so that counts never overflow int.
  for (int64_t off = 0; off < n; off += kMaxMpiCount) {
    int count = static_cast<int>(std::min<int64_t>(kMaxMpiCount, n - off));
    MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p + off * size, count, type, op, comm_), what);
  }
}

void Communicator::bcast(void* data, int64_t n, MPI_Datatype type, int root,
                         const char* what) const {
  auto* p = static_cast<char*>(data);
  int size = 0;
  MPI_Type_size(type, &size);
  for (int64_t off = 0; off < n; off += kMaxMpiCount) {
    int count = static_cast<int>(std::min<int64_t>(kMaxMpiCount, n - off));
    MOE_MPI_CHECK(MPI_Bcast(p + off * size, count, type, root, comm_), what);
  }
}

void Communicator::broadcast(std::string& s, int root, const char* what) const {
  int64_t n = static_cast<int64_t>(s.size());
  broadcast(&n, 1, root, what);
  s.resize(static_cast<size_t>(n));
  if (n > 0) bcast(s.data(), n, MPI_CHAR, root, what);
}

bool Communicator::any(bool flag, const char* what) const {
  int v = flag ? 1 : 0;
  MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_LOR, comm_), what);
  return v != 0;
}

void Communicator::agree(const std::string& error, ErrorKind kind, const char* what) const {
  int first = error.empty() ? size_ : rank_;
  MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, comm_), what);
  if (first == size_) return;
  std::string msg = error;
  broadcast(msg, first, what);
  if (size_ == 1) throw Error(kind, msg);
  throw Error(kind, cat("rank ", first, ": ", msg));
}

std::string check_ranks_per_node(int ranks_per_node, int n_ranks) {
  if (ranks_per_node < 0)
    return cat("comm.ranks_per_node = ", ranks_per_node,
               " is negative; use 0 to detect nodes or N > 0 for blocks of N ranks");
  if (ranks_per_node > 0 && n_ranks % ranks_per_node != 0)
    return cat("comm.ranks_per_node = ", ranks_per_node, " does not divide the ", n_ranks,
               " ranks into whole nodes; use 0 (detect) or a divisor of ", n_ranks);
  return "";
}

std::string NodeLayout::describe() const {
  if (uniform())
    return cat(n_nodes, n_nodes == 1 ? " node x " : " nodes x ", ranks_per_node,
               ranks_per_node == 1 ? " rank" : " ranks", forced ? " (comm.ranks_per_node)" : "");
  std::vector<int> count(static_cast<size_t>(n_nodes), 0);
  for (int v : node) ++count[v];
  std::string s = cat(n_nodes, " nodes, uneven:");
  for (int c : count) s += cat(" ", c);
  return s + " ranks";
}

NodeLayout node_layout(const Communicator& comm, int ranks_per_node) {
  const std::string bad = check_ranks_per_node(ranks_per_node, comm.size());
  if (!bad.empty()) throw Error(ErrorKind::kConfig, bad);
  const int P = comm.size();
  NodeLayout out;
  out.node.assign(static_cast<size_t>(P), 0);
  out.local.assign(static_cast<size_t>(P), 0);
  if (ranks_per_node > 0) {
    out.forced = true;
    out.n_nodes = P / ranks_per_node;
    out.ranks_per_node = ranks_per_node;
    for (int q = 0; q < P; ++q) {
      out.node[q] = q / ranks_per_node;
      out.local[q] = q % ranks_per_node;
    }
    return out;
  }
  // Each rank learns the lowest rank on its node (node rank 0: split_node orders by rank), then
  // every rank learns every rank's, which numbers the nodes identically everywhere.
  Communicator node = comm.split_node();
  int leader = comm.rank();
  node.broadcast(&leader, 1, 0, "node layout");
  const std::vector<int> leaders = comm.allgather(leader, "node layout");
  std::vector<int> distinct = leaders;
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  out.n_nodes = static_cast<int>(distinct.size());
  std::vector<int> count(distinct.size(), 0);
  for (int q = 0; q < P; ++q) {
    const int v = static_cast<int>(std::lower_bound(distinct.begin(), distinct.end(), leaders[q]) -
                                   distinct.begin());
    out.node[q] = v;
    out.local[q] = count[v]++;
  }
  out.ranks_per_node = count[0];
  for (int c : count)
    if (c != count[0]) out.ranks_per_node = 0;
  return out;
}

}  // namespace moe::comm
