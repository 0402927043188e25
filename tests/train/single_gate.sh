#!/usr/bin/env bash
# single_gate.sh — model.moe.router = single_gate trains through all phases under mpirun -np 2
# (10 steps of tiny.yaml with 3 blocks: 4 base, K-means, 5 experts, 1 gate); every step's
# metrics name the phase; resuming mid-phase (step 7) is bit-exact on np 2 and matches on np 1;
# resuming at the end of the base phase (step 4) reruns K-means identically; a base checkpoint
# (a dense Transformer's or a single_gate run's) skips phase (a); with freeze_base (the default)
# the base's tensors do not change after phase (a); train.on_nonfinite=skip skips NaN steps;
# moe-generate refuses the checkpoint with an error naming the router.
source "$(dirname "$0")/lib.sh"
sg=(--set model.moe.router=single_gate --set model.n_layers=3 --set train.steps=10
  --set model.single_gate.kmeans_sequences=32 --set checkpoint.every=1 --set checkpoint.keep=20
  --set train.eval_every=5)
train 2 full "${sg[@]}"
/usr/bin/python3 - "$S/full.jsonl" <<'PY' || fail "metrics of the full run"
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in recs if not r.get("summary")]
phases = [r["phase"] for r in steps]
assert phases == ["base"] * 4 + ["experts"] * 5 + ["gate"], phases
for r in steps:
    assert math.isfinite(r["loss"]) and r["dead_experts"] >= 0, r
assert 0 <= steps[-1]["gate_accuracy"] <= 1, steps[-1]
assert any(r["expert_imbalance"] >= 1 for r in steps if r["phase"] == "experts")
print("phases ok; last val", steps[-1]["val_loss"])
PY
# freeze_base (the default): after phase (a) (step 4) the embedding, shared block, base branch
# and the base's later copy stay bit-identical through (c) and (d); the experts train in (c)
# (steps 5-9) and the gate in (d) (step 10).
/usr/bin/python3 - "$S/full/ck" <<'PY' || fail "frozen base"
import sys, h5py, numpy as np
ck = sys.argv[1]
def dense(step):
    with h5py.File(f"{ck}/step-{step:08d}/model.h5", "r") as f:
        return {k: np.array(v) for k, v in f["/model/dense"].items()}
def experts(step):
    out = {}
    with h5py.File(f"{ck}/step-{step:08d}/model.h5", "r") as f:
        f["/model/experts"].visititems(
            lambda n, o: out.__setitem__(n, np.array(o)) if isinstance(o, h5py.Dataset) else None)
    return out
a, c, d = dense(4), dense(9), dense(10)
base = [k for k in a if not k.startswith("gate.")]
assert any(k.startswith("blocks.0.") for k in base) and "base_norm.gain" in base, sorted(a)
for k in base:
    assert np.array_equal(a[k], d[k]), f"{k} changed after phase (a)"
assert any(not np.array_equal(c[k], d[k]) for k in a if k.startswith("gate.")), "gate not trained"
e5, e9 = experts(5), experts(9)
assert e5 and any(not np.array_equal(e5[k], e9[k]) for k in e5), "experts not trained"
print("frozen base ok:", len(base), "tensors unchanged from step 4 to 10")
PY
train 2 mid "${sg[@]}" --resume "$S/full/ck/step-00000007"
compare --keys loss,grad_norm,val_loss --steps 8:10 --tol 0 "$S/full.jsonl" "$S/mid.jsonl"
train 1 mid_np1 "${sg[@]}" --resume "$S/full/ck/step-00000007"
compare --keys loss,val_loss --steps 8:10 --tol 1e-4 "$S/full.jsonl" "$S/mid_np1.jsonl"
train 2 after_base "${sg[@]}" --resume "$S/full/ck/step-00000004"
compare --keys loss,grad_norm,val_loss --steps 5:10 --tol 0 "$S/full.jsonl" "$S/after_base.jsonl"
# A base checkpoint skips phase (a): a dense Transformer's (3 blocks, same names) and the full
# run's step 4.
train 2 dense --set model.moe.every_n_layers=0 --set model.n_layers=3 --set train.steps=4
for base in "$S/dense/ck" "$S/full/ck/step-00000004"; do
  train 2 from_base "${sg[@]}" --set model.single_gate.base_checkpoint="$base"
  grep -q '"phases":{"base":0,"experts":9,"gate":1}' "$S/from_base.jsonl" ||
    fail "phases from base $base"
done
# train.on_nonfinite=skip: from the step-7 checkpoint with a NaN in the (frozen) base branch
# every step's loss is NaN; both steps are skipped, named on stderr, and the run exits 0.
cp -r "$S/full/ck/step-00000007" "$S/nan"
/usr/bin/python3 -c '
import sys, h5py
with h5py.File(sys.argv[1], "r+") as f:
    f["/model/dense/base_norm.gain"][0, 0] = float("nan")' "$S/nan/model.h5"
train 2 skip "${sg[@]}" --set train.on_nonfinite=skip --resume "$S/nan" --stop-after 2
/usr/bin/python3 - "$S/skip.jsonl" <<'PY' || fail "skipped steps"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in recs if not r.get("summary")]
assert [(r["step"], r.get("skipped")) for r in steps] == [(8, True), (9, True)], steps
assert recs[-1].get("skipped_steps") == 2, recs[-1]
PY
grep -Eq "step 9: loss is -?nan: update skipped" "$S/skip.log" || fail "no warning for step 9"
gen=$(dirname "$MOE_TRAIN")/moe-generate
if timeout 60 "${MPIRUN[@]}" -np 1 "$gen" --checkpoint "$S/full/ck" --prompt "In the" \
    --max-tokens 4 >"$S/gen.log" 2>&1; then
  fail "moe-generate accepted a single_gate checkpoint"
fi
grep -q "rank 0: error: .*single_gate" "$S/gen.log" || { cat "$S/gen.log"; fail "no clear error"; }
echo "single_gate: ok"
