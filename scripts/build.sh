#!/usr/bin/env bash
# Configures and builds (Release, -O3 -march=native) into ${BUILD_DIR:-build}; programs land in
# build/bin/. Assumes the dependencies are installed (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" "$@" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
