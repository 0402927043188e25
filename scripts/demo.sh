#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to the main job on the bundled default:
# installs what is missing, builds, exports the King James Bible (and the fortunes corpus for
# task experiments) from Debian's packages, builds the HDF5 token files, trains the small MoE
# (examples/configs/small.yaml: 4 blocks, d_model 256, 8 experts top-2) on 2 MPI ranks for about
# five minutes with the validation loss printed as it falls, saves a checkpoint, and prints a
# generated sample. Extra arguments go to moe-train (e.g. --set train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
source scripts/env.sh
bash scripts/build.sh
bin=${BUILD_DIR:-build}/bin
ranks=${RANKS:-2}

bash scripts/export-corpus.sh data
[ -s data/kjv.h5 ] || "$bin/moe-data" build --input data/kjv.txt --output data/kjv.h5
[ -s data/fortunes.h5 ] || "$bin/moe-data" build --input data/fortunes.txt --output data/fortunes.h5
echo
"$bin/moe-data" info data/kjv.h5
echo
rm -rf runs/small
mpirun -np "$ranks" "$bin/moe-train" --config examples/configs/small.yaml \
  --metrics runs/small/metrics.jsonl "$@"
echo
echo "validation loss (nats per byte) as training went:"
/usr/bin/python3 - runs/small/metrics.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "val_loss" in r and "step" in r:
        print(f"  step {r['step']:4d}: val loss {r['val_loss']:.3f}   train loss {r['loss']:.3f}")
PY
echo
mpirun -np "$ranks" "$bin/moe-generate" --checkpoint runs/small/checkpoints \
  --prompt "And God said unto Moses," --max-tokens 300 --temperature 0.7 --seed 1
