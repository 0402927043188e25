// File: error.hpp — the project's one error type, check macros and the single fatal path.
//
// Library code throws moe::Error with context; a program's main() catches everything and calls
// moe::fatal(), which prints `rank R: error: <what> (<where>)` to stderr, flushes, and brings the
// whole MPI job down with MPI_Abort so that no peer is left waiting in a collective.
//
// Exit codes (documented in the README): 1 config, 2 data, 3 comm, 70 internal.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

enum class ErrorKind : int { kConfig = 1, kData = 2, kComm = 3, kInternal = 70 };

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what, std::string where = {})
      : std::runtime_error(what), kind_(kind), where_(std::move(where)) {}
  ErrorKind kind() const { return kind_; }
  int exit_code() const { return static_cast<int>(kind_); }
  const std::string& where() const { return where_; }
  // "<what> (<where>)" or just "<what>".
  std::string message() const;

 private:
  ErrorKind kind_;
  std::string where_;
};

// Streams its arguments into one string: cat("layer ", 3, ": ", x).
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// The rank used in error prefixes: MPI's rank once MPI is initialised, else 0.
int error_rank();

// Prints `rank R: error: <message>` to stderr, flushes stdout/stderr and the metrics sinks, and
// ends the job: MPI_Abort(MPI_COMM_WORLD, code) when MPI is initialised, exit(code) otherwise.
[[noreturn]] void fatal(const std::string& message, int exit_code);
[[noreturn]] void fatal(const Error& error);

// Runs body(); turns any exception into fatal(). Every program's main() goes through this.
template <typename F>
int run_or_die(F&& body) {
  try {
    return body();
  } catch (const Error& e) {
    fatal(e);
  } catch (const std::exception& e) {
    fatal(cat("internal: ", e.what()), static_cast<int>(ErrorKind::kInternal));
  } catch (...) {
    fatal("internal: unknown exception", static_cast<int>(ErrorKind::kInternal));
  }
}

}  // namespace moe

#define MOE_WHERE                                                             \
  (std::string(__FILE__).substr(std::string(__FILE__).rfind('/') + 1) + ":" + \
   std::to_string(__LINE__))

// Internal invariant: a failure is a bug in this project.
#define MOE_CHECK(cond, ...)                                                                 \
  do {                                                                                       \
    if (!(cond))                                                                             \
      throw ::moe::Error(::moe::ErrorKind::kInternal,                                        \
                         ::moe::cat("check failed: " #cond ": ", ##__VA_ARGS__), MOE_WHERE); \
  } while (0)

#define MOE_CHECK_EQ(a, b, ...)                                                                 \
  do {                                                                                          \
    const auto moe_a_ = (a);                                                                    \
    const auto moe_b_ = (b);                                                                    \
    if (!(moe_a_ == moe_b_))                                                                    \
      throw ::moe::Error(::moe::ErrorKind::kInternal,                                           \
                         ::moe::cat("check failed: " #a " == " #b " (", moe_a_, " vs ", moe_b_, \
                                    "): ", ##__VA_ARGS__),                                      \
                         MOE_WHERE);                                                            \
  } while (0)

// Shape contract at a layer boundary: MOE_CHECK_SHAPE(x, T, d, "moe_layer.forward x").
#define MOE_CHECK_SHAPE(view, n_rows, n_cols, what)                                    \
  do {                                                                                 \
    if ((view).rows != (n_rows) || (view).cols != (n_cols))                            \
      throw ::moe::Error(::moe::ErrorKind::kInternal,                                  \
                         ::moe::cat(what, ": shape [", (view).rows, ", ", (view).cols, \
                                    "], expected [", (n_rows), ", ", (n_cols), "]"),   \
                         MOE_WHERE);                                                   \
  } while (0)
