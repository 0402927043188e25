// File: alltoallv.cpp — plain row All2All; see alltoallv.hpp.
#include "comm/alltoallv.hpp"

#include <climits>

#include "runtime/error.hpp"

namespace moe::comm {
namespace {

// Counts [P] in rows -> int counts and displacements; an error names what overflows.
void to_int(const std::vector<int64_t>& counts, std::vector<int>& c, std::vector<int>& displs,
            const char* what) {
  c.resize(counts.size());
  displs.resize(counts.size());
  int64_t off = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    if (counts[r] > INT_MAX || off > INT_MAX)
      throw Error(ErrorKind::kComm, cat(what, ": ", counts[r], " rows at offset ", off,
                                        " for rank ", r, " exceed INT_MAX"));
    c[r] = static_cast<int>(counts[r]);
    displs[r] = static_cast<int>(off);
    off += counts[r];
  }
}

}  // namespace

std::vector<int64_t> alltoall_counts(const Communicator& comm,
                                     const std::vector<int64_t>& send_counts, int per,
                                     const char* what) {
  MOE_CHECK_EQ(static_cast<int64_t>(send_counts.size()), int64_t{comm.size()} * per, what);
  std::vector<int64_t> recv(send_counts.size());
  MOE_MPI_CHECK(
      MPI_Alltoall(send_counts.data(), per, MPI_INT64_T, recv.data(), per, MPI_INT64_T, comm.raw()),
      what);
  return recv;
}

void alltoallv_rows(const Communicator& comm, const void* send,
                    const std::vector<int64_t>& send_counts, void* recv,
                    const std::vector<int64_t>& recv_counts, int64_t row_bytes, const char* what) {
  MOE_CHECK(row_bytes > 0 && row_bytes <= INT_MAX, what, ": row of ", row_bytes, " bytes");
  MOE_CHECK_EQ(static_cast<int>(send_counts.size()), comm.size(), what);
  MOE_CHECK_EQ(static_cast<int>(recv_counts.size()), comm.size(), what);
  std::vector<int> sc, sd, rc, rd;
  to_int(send_counts, sc, sd, what);
  to_int(recv_counts, rc, rd, what);
  MPI_Datatype row;
  MOE_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(row_bytes), MPI_BYTE, &row), what);
  MOE_MPI_CHECK(MPI_Type_commit(&row), what);
  // MPI wants non-null buffers even for zero counts on some implementations.
  static char dummy = 0;
  const int rc_code = MPI_Alltoallv(send ? send : &dummy, sc.data(), sd.data(), row,
                                    recv ? recv : &dummy, rc.data(), rd.data(), row, comm.raw());
  MPI_Type_free(&row);
  MOE_MPI_CHECK(rc_code, what);
}

}  // namespace moe::comm
