#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to the main job on the bundled default:
# installs what is missing, builds, exports the King James Bible (and the fortunes corpus for
# task experiments) from Debian's packages, builds the HDF5 token files, prints their
# statistics, and reads training batches from them on 2 MPI ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/env.sh
bash scripts/build.sh
bin=${BUILD_DIR:-build}/bin

bash scripts/export-corpus.sh data
[ -s data/kjv.h5 ] || "$bin/moe-data" build --input data/kjv.txt --output data/kjv.h5
[ -s data/fortunes.h5 ] || "$bin/moe-data" build --input data/fortunes.txt --output data/fortunes.h5
echo
"$bin/moe-data" info data/kjv.h5
echo
"$bin/moe-data" info data/fortunes.h5
echo
mpirun -np 2 "$bin/moe-bench" data --config examples/configs/default.yaml
