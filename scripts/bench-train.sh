#!/usr/bin/env bash
# Training throughput and MFU against the PyTorch reference, measured back to back on this
# machine: our moe-train step on the reference's model (d_model D, 4 blocks, 4 heads, 8 experts
# top-2 of width F, seq 256, batch 8, byte vocabulary, untied head, GELU) and
# ../shared/bench/torch_reference.py train with the same shape.
#   scripts/bench-train.sh [D=256] [F=1024] [RANKS=2] [THREADS=1] [moe-train ARGS...]
# (extra arguments go to moe-train, e.g. --set comm.rebalance.every=5)
# Prints tokens/s of both, their ratio, and MFU against the same fp32 peak (201.6 GFLOP/s by the
# reference's convention, and our measured one).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-256} F=${2:-1024} RANKS=${3:-2} THREADS=${4:-1}
STEPS=${STEPS:-25}
shift $(($# < 4 ? $# : 4))
source scripts/env.sh
bin=${BUILD_DIR:-build}/bin
ref=${TORCH_REFERENCE:-../shared/bench/torch_reference.py}
[ -s data/kjv.h5 ] || { bash scripts/export-corpus.sh data >/dev/null; "$bin/moe-data" build --input data/kjv.txt --output data/kjv.h5 >/dev/null; }
out=runs/bench-train-d$D
rm -rf "$out"
# Open MPI binds each rank to one core by default: a rank with several threads needs
# --bind-to none, or its threads share one core.
bind=()
[ "$THREADS" -gt 1 ] && bind=(--bind-to none)
OMP_NUM_THREADS=$THREADS mpirun -np "$RANKS" "${bind[@]}" "$bin/moe-train" --config examples/configs/small.yaml \
  --set model.d_model="$D" --set model.moe.d_ff="$F" --set model.n_heads=4 \
  --set train.global_batch=8 --set train.micro_batch=$((8 / RANKS)) --set train.steps="$STEPS" \
  --set train.eval_every=0 --set train.eval_batches=1 --set run.dir="$out" \
  --set checkpoint.dir="$out/checkpoints" --set log.every=1000 --metrics "$out/metrics.jsonl" "$@" >/dev/null
ours=$(/usr/bin/python3 - "$out/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "step" in r and not r.get("summary")][3:]  # skip warm-up steps
summary = [r for r in rows if r.get("summary")][0]
tps = statistics.median(r["tokens_per_s"] for r in steps)
mfu = statistics.median(r["mfu"] for r in steps)
imb = statistics.median(r.get("rank_imbalance", 1.0) for r in steps)
print(f"{tps:.1f} {mfu:.4f} {summary['peak_gflops']:.1f} {imb:.3f}")
PY
)
read -r our_tps our_mfu our_peak our_imb <<<"$ours"
torch_json=$(/usr/bin/python3 "$ref" train --d-model "$D" --d-ff "$F" --threads $((RANKS * THREADS)) \
  --samples 5 --min-time 1.0 --json | tail -n 1)
/usr/bin/python3 - "$our_tps" "$our_mfu" "$our_peak" "$torch_json" "$D" "$F" "$RANKS" "$THREADS" "$our_imb" <<'PY'
import json, sys
tps, mfu, peak = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
t = json.loads(sys.argv[4])
tt = t.get("train", t)
ref_tps = tt["tokens_per_s"]["median"] if isinstance(tt["tokens_per_s"], dict) else tt["tokens_per_s"]
flops_tok = tt.get("flops_per_token") or 0
print(f"model d_model {sys.argv[5]}, expert d_ff {sys.argv[6]}, {sys.argv[7]} rank(s) x {sys.argv[8]} thread(s)")
print(f"  ours      {tps:9.1f} tokens/s   MFU {100*mfu:5.1f}% of measured peak {peak:.1f} GFLOP/s")
if flops_tok:
    print(f"            {'':9s}            MFU {100*tps*flops_tok/201.6e9:5.1f}% by the reference's formula and 201.6 GFLOP/s")
print(f"            per-rank load imbalance (max/mean, median step) {float(sys.argv[9]):.3f}")
print(f"  pytorch   {ref_tps:9.1f} tokens/s")
print(f"  ratio     {tps/ref_tps:9.3f} x")
print(json.dumps({"bench": "train", "d_model": int(sys.argv[5]), "tokens_per_s": tps, "mfu": mfu,
                  "peak_gflops": peak, "rank_imbalance": float(sys.argv[9]), "torch_tokens_per_s": ref_tps, "ratio_vs_torch": tps / ref_tps}))
PY
