// File: alltoallv.hpp — plain row All2All over a Communicator, for layers with their own
// packing (the PEER layer's embedding-style exchange).
//
// Notation: P ranks; a "row" is row_bytes contiguous bytes. Buffers are grouped by rank: the
// rows for (or from) rank r follow those of ranks < r, with no gaps.
//
// Both calls are collective over comm: every rank calls them in the same order, also with
// nothing to send. Counts are in rows (an MPI datatype of row_bytes bytes); more than INT_MAX
// rows to or from one rank is an Error(kComm) naming the operation.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.hpp"

namespace moe::comm {

// send_counts [P * per] (per values for each destination) -> [P * per] the values each source
// sent to this rank (MPI_Alltoall of `per` int64 per rank).
std::vector<int64_t> alltoall_counts(const Communicator& comm,
                                     const std::vector<int64_t>& send_counts, int per,
                                     const char* what);

// send rows grouped by destination (send_counts [P]) -> recv rows grouped by source
// (recv_counts [P], from alltoall_counts). recv must hold sum(recv_counts) rows.
void alltoallv_rows(const Communicator& comm, const void* send,
                    const std::vector<int64_t>& send_counts, void* recv,
                    const std::vector<int64_t>& recv_counts, int64_t row_bytes, const char* what);

}  // namespace moe::comm
