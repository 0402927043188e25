#!/usr/bin/env bash
# single_gate.sh — model.moe.router = single_gate trains through all phases under mpirun -np 2
# (10 steps of tiny.yaml with 3 blocks: 4 base, K-means, 5 experts, 1 gate); every step's
# metrics name the phase; resuming mid-phase (step 7) is bit-exact on np 2 and matches on np 1;
# resuming at the end of the base phase (step 4) reruns K-means identically; a base checkpoint
# (a dense Transformer's or a single_gate run's) skips phase (a); moe-generate refuses the checkpoint with an error naming the router.
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
gen=$(dirname "$MOE_TRAIN")/moe-generate
if timeout 60 "${MPIRUN[@]}" -np 1 "$gen" --checkpoint "$S/full/ck" --prompt "In the" \
    --max-tokens 4 >"$S/gen.log" 2>&1; then
  fail "moe-generate accepted a single_gate checkpoint"
fi
grep -q "rank 0: error: .*single_gate" "$S/gen.log" || { cat "$S/gen.log"; fail "no clear error"; }
echo "single_gate: ok"
