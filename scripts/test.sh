#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite (unit, mpi and program tests).
# Exits non-zero on any failure. Extra arguments go to ctest (e.g. -L unit, -R config).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/env.sh
bash scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure --timeout 300 -j "$(nproc)" "$@"
