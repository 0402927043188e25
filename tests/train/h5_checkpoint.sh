#!/usr/bin/env bash
# h5_checkpoint.sh CHECKPOINT — h5dump and h5py read a moe-train checkpoint (tiny.yaml, 2 ranks,
# step 20): /model/dense/embed.weight is float32 [256, 64]; the root attributes format_version,
# step and world_size; every expert (layer0..1, expert0..3) with w1 [64, 128] and w2 [128, 64];
# Adam moments under /optim/m and /optim/v, each having taken exactly one update per step.
set -u -o pipefail
ckpt=${1:?CHECKPOINT}
h5dump -H -d /model/dense/embed.weight "$ckpt/model.h5" | tee /dev/stderr |
  grep -q 'DATASPACE  SIMPLE { ( 256, 64 ) / ( 256, 64 ) }' || { echo "FAIL: h5dump"; exit 1; }
/usr/bin/python3 - "$ckpt/model.h5" <<'PY'
import sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    e = f["/model/dense/embed.weight"]
    assert e.shape == (256, 64) and e.dtype == "float32", (e.shape, e.dtype)
    a = dict(f.attrs)
    assert a["format_version"] == 1 and a["step"] == 20 and a["world_size"] == 2, a
    assert "d_model: 64" in str(a["config"]), a["config"]
    for layer in range(2):
        for x in range(4):
            g = f[f"/model/experts/layer{layer}/expert{x}"]
            assert g["w1"].shape == (64, 128) and g["w2"].shape == (128, 64)
    for moment in ("m", "v"):
        m = f[f"/optim/{moment}/dense/embed.weight"]
        assert m.shape == (256, 64)
        assert m.attrs["step"] == 20, ("optimiser updates after 20 steps", m.attrs["step"])
    print("h5py:", e.name, e.shape, e.dtype, {k: a[k] for k in ("step", "world_size")})
PY
