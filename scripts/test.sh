#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite (unit, mpi and program tests).
# Exits non-zero on any failure. Extra arguments go to ctest (e.g. -L unit, -R config).
# --with-slurm (first argument) also installs Slurm and munge and runs the `slurm` label (a real
# single-machine Slurm cluster, tests/slurm/run_slurm_test.sh; needs root); without it that label
# is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
with_slurm=0
if [ "${1:-}" = --with-slurm ]; then
  with_slurm=1
  shift
fi
if [ "$with_slurm" = 1 ]; then bash scripts/install-deps.sh --with-slurm; else bash scripts/install-deps.sh; fi
source scripts/env.sh
bash scripts/build.sh
cd "${BUILD_DIR:-build}"
select=()
[ "$with_slurm" = 1 ] || select=(-LE slurm)
ctest --output-on-failure --timeout 300 -j "$(nproc)" "${select[@]}" "$@"
