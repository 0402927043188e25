#include "runtime/error.hpp"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>

namespace moe {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kConfig:
      return "config";
    case ErrorKind::kData:
      return "data";
    case ErrorKind::kComm:
      return "comm";
    case ErrorKind::kInternal:
      return "internal";
  }
  return "unknown";
}

std::string Error::message() const {
  if (where_.empty()) return what();
  return cat(what(), " (", where_, ")");
}

int error_rank() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return 0;
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

void fatal(const std::string& message, int exit_code) {
  std::fflush(stdout);
  std::fprintf(stderr, "rank %d: error: %s\n", error_rank(), message.c_str());
  std::fflush(stderr);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) {
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    // A one-rank job can leave quietly; MPI_Abort would print a multi-line banner for nothing.
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, exit_code);
    MPI_Finalize();
  }
  std::exit(exit_code);
}

void fatal(const Error& error) {
  fatal(cat(error_kind_name(error.kind()), ": ", error.message()), error.exit_code());
}

}  // namespace moe
