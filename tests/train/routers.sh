#!/usr/bin/env bash
# routers.sh — every router trains end to end under mpirun -np 2 (8 steps of tiny.yaml):
# topk, topk_bias with a shared expert, expert_choice with a shared expert. Every step's metrics
# and the summary carry dead_experts and router_kl. topk_bias: its bias is in the checkpoint
# (non-zero after 4 steps), resuming through it is bit-exact on np 2 and matches on np 1 (1e-4).
# moe-generate refuses an expert_choice checkpoint with an error naming the router.
source "$(dirname "$0")/lib.sh"
short=(--set train.steps=8 --set checkpoint.every=4 --set train.eval_every=4)
check_metrics() {
  /usr/bin/python3 - "$1" <<'PY' || fail "metrics of $1"
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in recs if not r.get("summary")]
summary = [r for r in recs if r.get("summary")]
assert len(steps) >= 1 and len(summary) == 1, "steps or summary missing"
for r in steps + summary:
    assert isinstance(r["dead_experts"], int) and r["dead_experts"] >= 0, r
    assert 0.0 <= r["router_kl"] <= math.log(4) + 1e-9, r
for r in steps:
    assert math.isfinite(r["loss"]), r
print(sys.argv[1], "ok: last loss", steps[-1]["loss"], "router_kl", summary[0]["router_kl"],
      "dead", summary[0]["dead_experts"])
PY
}
bias=(--set model.moe.router=topk_bias --set model.moe.bias_update_rate=0.05
  --set model.moe.shared_experts=1)
train 2 topk "${short[@]}" --set model.moe.router=topk
check_metrics "$S/topk.jsonl"
train 2 ec "${short[@]}" --set model.moe.router=expert_choice --set model.moe.shared_experts=1
check_metrics "$S/ec.jsonl"
train 2 bias "${short[@]}" "${bias[@]}"
check_metrics "$S/bias.jsonl"

# The bias is in the checkpoint and has moved.
/usr/bin/python3 - "$S/bias/ck/step-00000004/model.h5" <<'PY' || fail "router bias not in the checkpoint"
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
for l in (0, 1):
    b = np.asarray(f[f"/model/dense/blocks.{l}.moe.router.bias"])
    assert b.shape == (1, 4) and np.abs(b).max() > 0, b
    assert f"/model/dense/blocks.{l}.moe.shared.w1" in f
print("bias at step 4:", np.asarray(f["/model/dense/blocks.0.moe.router.bias"]).ravel())
PY
train 2 bias_part "${short[@]}" "${bias[@]}" --stop-after 4
train 2 bias_rest "${short[@]}" "${bias[@]}" --resume "$S/bias_part/ck"
compare --keys loss,grad_norm,val_loss --steps 5:8 --tol 0 "$S/bias.jsonl" "$S/bias_rest.jsonl"
train 1 bias_np1 "${short[@]}" "${bias[@]}" --resume "$S/bias_part/ck"
compare --keys loss,val_loss --steps 5:8 --tol 1e-4 "$S/bias.jsonl" "$S/bias_np1.jsonl"

# Expert choice cannot decode causally: a clear error, non-zero exit.
gen=$(dirname "$MOE_TRAIN")/moe-generate
if timeout 60 "${MPIRUN[@]}" -np 1 "$gen" --checkpoint "$S/ec/ck" --prompt "In the" \
    --max-tokens 4 >"$S/gen.log" 2>&1; then
  fail "moe-generate accepted an expert_choice checkpoint"
fi
grep -q "rank 0: error: .*expert_choice" "$S/gen.log" || { cat "$S/gen.log"; fail "no clear error"; }
echo "routers: ok"
