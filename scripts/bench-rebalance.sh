#!/usr/bin/env bash
# Load balancing in the exchange (comm.rebalance), measured back to back: the demo model
# (examples/configs/small.yaml: 4 blocks, d_model 256, 8 experts top-2 of width 1024, seq 256,
# global batch 8) trained for STEPS steps three ways on the same ranks:
#   unskewed        the router as it is
#   skewed          bench.router_skew=1: expert 0 takes one slot of every token (half of all
#                   slots; a benchmark knob that leaves the maths exact), experts blocked
#   skewed+rebal    the same with comm.rebalance.every=5 (and comm.rebalance.replicas=REPLICAS)
# on 2 ranks x 1 thread (one per core) and on 4 ranks x 1 thread (4 ranks share 2 cores here,
# so those timings say little), then the cost model's prediction for more ranks (moe-plan).
# Prints the median step time over the steps after WARMUP, its ratio to the unskewed run's, and
# the mean per-rank imbalance (max / mean kept slots received per rank, all MoE layers).
#   scripts/bench-rebalance.sh            (STEPS=30 WARMUP=10 REPLICAS=2 RANKS="2 4")
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-30} WARMUP=${WARMUP:-10} REPLICAS=${REPLICAS:-2} RANKS=${RANKS:-"2 4"}
source scripts/env.sh
bin=${BUILD_DIR:-build}/bin
[ -s data/kjv.h5 ] || { bash scripts/export-corpus.sh data >/dev/null; "$bin/moe-data" build --input data/kjv.txt --output data/kjv.h5 >/dev/null; }
out=runs/bench-rebalance
rm -rf "$out"
mkdir -p "$out"

run() {  # run NP NAME ARGS...
  local np=$1 name=$2
  shift 2
  OMP_NUM_THREADS=1 mpirun -np "$np" "$bin/moe-train" --config examples/configs/small.yaml \
    --set train.global_batch=8 --set train.micro_batch=$((8 / np)) --set train.steps="$STEPS" \
    --set train.eval_every=0 --set train.eval_batches=1 --set run.dir="$out/$name" \
    --set checkpoint.dir="$out/$name/ck" --set checkpoint.every=0 --set log.every=1000 \
    --metrics "$out/$name.jsonl" "$@" >"$out/$name.log" 2>&1 ||
    { tail -n 20 "$out/$name.log"; exit 1; }
}

for np in $RANKS; do
  run "$np" "np$np-unskewed"
  run "$np" "np$np-skewed" --set bench.router_skew=1
  run "$np" "np$np-rebal" --set bench.router_skew=1 --set comm.rebalance.every=5 \
    --set comm.rebalance.replicas="$REPLICAS"
  /usr/bin/python3 - "$out" "$np" "$WARMUP" <<'PY'
import json, statistics, sys
out, np, warm = sys.argv[1], sys.argv[2], int(sys.argv[3])
def stats(name):
    rows = [json.loads(l) for l in open(f"{out}/np{np}-{name}.jsonl")]
    steps = [r for r in rows if "step" in r and not r.get("summary")][warm:]
    return (statistics.median(r["step_seconds"] for r in steps),
            statistics.mean(r["rank_imbalance"] for r in steps),
            steps[-1].get("replicas", 0), rows[-1].get("rebalances", 0), steps[-1]["loss"])
base = stats("unskewed")
print(f"{np} ranks x 1 thread (median step over steps {warm + 1}+; machine shared, see README)")
print(f"  {'run':14s} {'step s':>8s} {'vs unskewed':>11s} {'rank imb':>9s} {'replicas':>8s} {'moves':>5s}")
res = {}
for name in ("unskewed", "skewed", "rebal"):
    s = stats(name)
    res[name] = s
    label = {"rebal": "skewed+rebal"}.get(name, name)
    print(f"  {label:14s} {s[0]:8.3f} {s[0] / base[0]:10.2f}x {s[1]:9.3f} {s[2]:8d} {s[3]:5d}")
print(json.dumps({"bench": "rebalance", "ranks": int(np),
                  **{f"{k}_step_s": v[0] for k, v in res.items()},
                  **{f"{k}_rank_imbalance": v[1] for k, v in res.items()},
                  "rebal_vs_unskewed": res["rebal"][0] / base[0],
                  "skewed_vs_unskewed": res["skewed"][0] / base[0],
                  "same_loss_skewed_rebal": abs(res["rebal"][4] - res["skewed"][4]) < 1e-5}))
PY
done

# The cost model at more ranks: the hot expert at 4x the mean expert load (half of the slots of
# 8 experts top-2), blocked versus rebalanced with up to REPLICAS replicas; 4 ranks per node.
common=(--config examples/configs/small.yaml --set data.path=data/kjv.h5 --mode weak
  --micro-batch 4 --ranks-per-node 4 --nodes 1,2 --imbalance 4)
echo
echo "cost model (moe-plan), skewed, blocked placement:"
"$bin/moe-plan" "${common[@]}" | sed -n '/^weak scaling/,/^$/p'
echo "cost model (moe-plan), skewed, rebalanced with up to $REPLICAS replicas:"
"$bin/moe-plan" "${common[@]}" --rebalance "$REPLICAS" | sed -n '/^weak scaling/,/^$/p'
