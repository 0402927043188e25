#!/usr/bin/env bash
# checkpoints.sh — fixture for the checkpoint tests: a 20-step tiny.yaml run on 2 ranks
# ($S/base/ck/step-00000010 and step-00000020), and damaged copies of its step-10 checkpoint:
#   $S/bad/corrupt    model.h5 with its first 8 bytes (the HDF5 signature) zeroed
#   $S/bad/truncated  model.h5 cut to half its size
#   $S/bad/nan        model.h5 with /model/dense/final_norm.gain[0, 0] = NaN (a valid file whose
#                     weights give a NaN loss at the first resumed step, 11)
source "$(dirname "$0")/lib.sh"
train 2 base
ckpt=$S/base/ck/step-00000010
[ -f "$ckpt/model.h5" ] || fail "no checkpoint $ckpt"
mkdir -p "$S/bad"
for name in corrupt truncated nan; do cp -r "$ckpt" "$S/bad/$name"; done
/usr/bin/python3 - "$S/bad" <<'PY'
import os, sys
import h5py
bad = sys.argv[1]
with open(os.path.join(bad, "corrupt/model.h5"), "r+b") as f:
    f.write(b"\0" * 8)
path = os.path.join(bad, "truncated/model.h5")
os.truncate(path, os.path.getsize(path) // 2)
with h5py.File(os.path.join(bad, "nan/model.h5"), "r+") as f:
    f["/model/dense/final_norm.gain"][0, 0] = float("nan")
PY
ls -l "$S/bad"/*/model.h5
