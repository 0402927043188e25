// fail_rank MODE: a job in which one rank fails while the others wait in a collective.
//   throw   rank 1 throws an Error; the others sit in a barrier
//   kill    rank 1 dies by SIGKILL (a dead rank); the others sit in a barrier
// The program tests require a non-zero exit of the whole job within seconds and, for "throw",
// the message "rank 1: error: ...".
#include <csignal>
#include <cstring>
#include <string>

#include "comm/communicator.hpp"
#include "runtime/error.hpp"

int main(int argc, char** argv) {
  moe::comm::MpiSession mpi(&argc, &argv);
  return moe::run_or_die([&]() -> int {
    std::string mode = argc > 1 ? argv[1] : "throw";
    moe::comm::Communicator world = moe::comm::Communicator::world();
    if (world.rank() == 1) {
      if (mode == "kill") std::raise(SIGKILL);
      throw moe::Error(moe::ErrorKind::kData, "simulated failure on this rank", "fail_rank.cpp");
    }
    world.barrier("barrier that rank 1 never reaches");
    return 0;
  });
}
