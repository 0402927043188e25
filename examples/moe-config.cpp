// moe-config: the configuration schema and a checker for config files.
//   moe-config schema                         the schema as a Markdown table (the README's)
//   moe-config check --config F [--set k=v]   validate and print the resolved configuration
#include <cstdio>
#include <string>
#include <vector>

#include "runtime/config.hpp"
#include "runtime/error.hpp"
#include "runtime/run.hpp"

int main(int argc, char** argv) {
  return moe::run_or_die([&]() -> int {
    std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "schema") {
      std::printf("%s", moe::config_schema_markdown().c_str());
      return 0;
    }
    if (cmd == "check") {
      std::vector<std::string> rest;
      moe::Config c = moe::config_from_args(std::vector<std::string>(argv + 2, argv + argc), &rest);
      if (!rest.empty())
        throw moe::Error(moe::ErrorKind::kConfig,
                         moe::cat("moe-config: unexpected argument '", rest.front(), "'"));
      std::printf("%s", c.to_yaml().c_str());
      return 0;
    }
    std::fprintf(stderr,
                 "usage: moe-config schema\n"
                 "       moe-config check --config FILE [--set key=value ...]\n");
    return 1;
  });
}
