#!/usr/bin/env bash
# rebalance_resume.sh MODE — a run with expert re-placement (comm.rebalance) resumes exactly:
# tiny.yaml with 8 experts, expert 0 taking one slot of every token (bench.router_skew=1), no
# load-balancing loss, a re-plan every 2 steps, 8 steps, checkpoints every 4.
#   np2   8 uninterrupted steps against `--stop-after 4` (after re-placements at steps 2 and 4)
#         then `--resume`: steps 5..8 have bit-equal loss, grad_norm, lr and val_loss (tolerance
#         0) and the same per-rank loads (rank_load, so the same placement: nothing moved at the
#         resume), and the step-8 checkpoints hold the same placement and load averages.
#         Then a copy of the step-4 checkpoint without its placement (as older builds wrote it)
#         and the step-4 checkpoint under comm.rebalance.every=0 resume in blocks, saying why;
#         their losses equal the uninterrupted run's within 1e-5 (placement changes only the
#         summation order).
#   np4   the same exact resume with 2 replicas per layer; then the step-4 checkpoint resumes on
#         2 ranks in blocks ("written by 4 rank(s)"), steps 5..8 within 1e-4 of the 4-rank run.
source "$(dirname "$0")/lib.sh"
mode=${1:?MODE}
common=(--set model.moe.num_experts=8 --set bench.router_skew=1 --set model.moe.aux_loss_coef=0
  --set train.steps=8 --set checkpoint.every=4 --set train.eval_every=4)
case $mode in
  np2) np=2 rb=(--set comm.rebalance.every=2) ;;
  np4) np=4 rb=(--set comm.rebalance.every=2 --set comm.rebalance.replicas=2) ;;
  *) fail "unknown mode $mode" ;;
esac
train $np full "${common[@]}" "${rb[@]}"
train $np part "${common[@]}" "${rb[@]}" --stop-after 4
train $np rest "${common[@]}" "${rb[@]}" --resume "$S/part/ck"
grep -q "rebalance after step 2: .* moved" "$S/part.log" || fail "no re-placement before the checkpoint"
grep -q "expert placement and load averages restored" "$S/rest.log" ||
  fail "the resumed run did not restore the placement"
compare --keys loss,grad_norm,lr,val_loss --steps 1:4 --tol 0 "$S/full.jsonl" "$S/part.jsonl"
compare --keys loss,grad_norm,lr,val_loss --steps 5:8 --tol 0 "$S/full.jsonl" "$S/rest.jsonl"
/usr/bin/python3 - "$S" "$mode" <<'PY' || fail "placement check"
import json, sys
import h5py
S, mode = sys.argv[1], sys.argv[2]
def steps(name):
    return {r["step"]: r for r in map(json.loads, open(f"{S}/{name}.jsonl")) if "summary" not in r}
full, part, rest = steps("full"), steps("part"), steps("rest")
assert part[4]["rebalances"] >= 1, "no re-placement before the step-4 checkpoint"
if mode == "np4":
    assert part[4]["replicas"] > 0, "no replicas at the step-4 checkpoint"
for s in range(5, 9):
    for key in ("rank_load", "replicas", "rebalances"):
        assert full[s][key] == rest[s][key], (s, key, full[s][key], rest[s][key])
def state(path):
    with h5py.File(f"{path}/model.h5", "r") as f:
        return {k: f["state"][k][()].tolist() for k in f["state"]}
a, b = state(f"{S}/full/ck/step-00000008"), state(f"{S}/rest/ck/step-00000008")
assert a == b, "step-8 rebalancing state differs"
saved = state(f"{S}/part/ck/step-00000004")
assert saved == state(f"{S}/full/ck/step-00000004"), "step-4 rebalancing state differs"
blocked = [e * int(mode[2:]) // 8 for e in range(8)]
ranks = saved["rebalance.layer0.instance_ranks"]
assert ranks != blocked, ("the saved placement is the blocked one", ranks)
print("rank_load steps 5..8 equal; saved placement layer 0:", ranks)
PY
if [ "$mode" = np2 ]; then
  # A checkpoint without the placement (older builds), and rebalancing off: blocks, said once.
  cp -r "$S/part/ck/step-00000004" "$S/old"
  /usr/bin/python3 -c 'import h5py, sys; f = h5py.File(sys.argv[1], "r+"); del f["state"]' \
    "$S/old/model.h5" || fail "cannot strip /state"
  train 2 from_old "${common[@]}" "${rb[@]}" --resume "$S/old"
  grep -q "expert placement is not used (the checkpoint holds no expert placement)" \
    "$S/from_old.log" || fail "no 'not used' line for a checkpoint without placement"
  compare --keys loss,val_loss --steps 5:8 --tol 1e-5 "$S/full.jsonl" "$S/from_old.jsonl"
  train 2 off "${common[@]}" --resume "$S/part/ck"
  [ "$(grep -c "expert placement is not used (comm.rebalance.every is 0)" "$S/off.log")" = 1 ] ||
    fail "no single 'not used' line with rebalancing off"
  compare --keys loss,val_loss --steps 5:8 --tol 1e-5 "$S/full.jsonl" "$S/off.jsonl"
fi
if [ "$mode" = np4 ]; then
  train 2 to2 "${common[@]}" "${rb[@]}" --resume "$S/part/ck"
  grep -q "expert placement is not used (it was written by 4 rank(s), this run has 2)" \
    "$S/to2.log" || fail "no 'not used' line on another world size"
  compare --keys loss,val_loss --steps 5:8 --tol 1e-4 "$S/full.jsonl" "$S/to2.jsonl"
fi
echo OK
