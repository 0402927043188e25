#!/usr/bin/env bash
# rebalance.sh MODE — expert re-placement (comm.rebalance) changes where experts live, never the
# mathematics. tiny.yaml with 8 experts, expert 0 taking one slot of every token
# (bench.router_skew=1) and no load-balancing loss, 20 steps:
#   np2       rebalancing every 2 steps without replicas gives the losses of the same run
#             without rebalancing within 1e-5, logs its re-placements and evens the rank load;
#             the same with blocks of 8 and 4 experts (model.moe.layer_experts), and with
#             at most 5 experts per rank (comm.rebalance.max_experts_per_rank), which holds.
#   np4       the same with 2 replicas per layer; then the step-10 checkpoint (written while
#             replicas existed, each expert once) resumes on 2 ranks, steps 11..20 within 1e-4.
source "$(dirname "$0")/lib.sh"
mode=${1:?MODE}
common=(--set model.moe.num_experts=8 --set bench.router_skew=1 --set model.moe.aux_loss_coef=0)
case $mode in
  np2) np=2 rb=(--set comm.rebalance.every=2) ;;
  np4) np=4 rb=(--set comm.rebalance.every=2 --set comm.rebalance.replicas=2) ;;
  *) fail "unknown mode $mode" ;;
esac
train $np off "${common[@]}"
train $np on "${common[@]}" "${rb[@]}"
compare --keys loss,val_loss --steps 1:20 --tol 1e-5 "$S/off.jsonl" "$S/on.jsonl"
grep -q "rebalance after step 2: .* moved" "$S/on.log" || fail "no re-placement logged at step 2"
/usr/bin/python3 - "$S/off.jsonl" "$S/on.jsonl" "$mode" <<'PY' || fail "rank imbalance check"
import json, sys
def summary(path):
    rows = [json.loads(l) for l in open(path)]
    return [r for r in rows if "summary" not in r], rows[-1]
off, off_sum = summary(sys.argv[1])
on, on_sum = summary(sys.argv[2])
print("rank_imbalance_mean off", off_sum["rank_imbalance_mean"], "on", on_sum["rank_imbalance_mean"])
assert on_sum["rebalances"] >= 1
assert on_sum["rank_imbalance_mean"] < off_sum["rank_imbalance_mean"]
assert all("rank_load" in r and "replicas" in r for r in on)
if sys.argv[3] == "np4":
    assert on[9]["replicas"] > 0, "no replicas at the step-10 checkpoint"
PY
if [ "$mode" = np2 ]; then
  # Blocks of different expert counts (a pruned model's model.moe.layer_experts): each block's
  # loads and placement have their own size.
  le=(--set model.moe.layer_experts=8,4 --set train.steps=8)
  train 2 off_le "${common[@]}" "${le[@]}"
  train 2 on_le "${common[@]}" "${le[@]}" "${rb[@]}"
  compare --keys loss,val_loss --steps 1:8 --tol 1e-5 "$S/off_le.jsonl" "$S/on_le.jsonl"
  grep -q "rebalance after step 2: .* moved" "$S/on_le.log" || fail "no re-placement with layer_experts"
  # A cap of 5 instances per rank (LPT alone would give the hot expert's rank 1 and the other
  # 7): the same losses, the cap in the log and in every metrics record.
  train 2 on_cap "${common[@]}" "${rb[@]}" --set comm.rebalance.max_experts_per_rank=5
  compare --keys loss,val_loss --steps 1:20 --tol 1e-5 "$S/off.jsonl" "$S/on_cap.jsonl"
  grep -q "rebalance after step 2: .* at most [1-5] expert(s) on a rank (cap 5)" "$S/on_cap.log" ||
    fail "no capped re-placement logged at step 2"
  /usr/bin/python3 - "$S/on_cap.jsonl" <<'PY' || fail "cap check"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"summary"' not in l]
most = max(r["max_instances_per_rank"] for r in rows)
print("max_instances_per_rank", most, "cap", rows[-1]["max_experts_per_rank"])
assert all(r["max_experts_per_rank"] == 5 for r in rows) and most <= 5
PY
fi
if [ "$mode" = np4 ]; then
  ckpt=$S/on/ck/step-00000010
  [ -f "$ckpt/model.h5" ] || fail "no checkpoint $ckpt"
  train 2 to2 "${common[@]}" --resume "$ckpt"
  grep -q "resumed from .* at step 10 (written by 4 rank(s), now 2)" "$S/to2.log" ||
    fail "no 'resumed ... written by 4 rank(s), now 2' line"
  compare --keys loss,val_loss --steps 11:20 --tol 1e-4 "$S/on.jsonl" "$S/to2.jsonl"
fi
echo OK
