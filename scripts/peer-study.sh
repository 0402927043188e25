#!/usr/bin/env bash
# peer-study.sh [STEPS] — the PEER comparison of docs/results.md: examples/configs/small.yaml
# (4 blocks, d_model 256) with the middle block's FFN (block 2) as a dense FFN (d_ff 2048), as
# 8 experts top-2 (expert d_ff 1024: the same 2048 active hidden units), or as PEER (h = 8,
# k = 16, d_key 128, N = 256^2 and 1024^2); the other blocks dense (d_ff 2048) in every run.
# STEPS steps (default 60), global batch 8 x 256 tokens, on 2 ranks, one run after the other,
# then a markdown table: validation loss, usage, unevenness KL, tokens/s, PEER exchange bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
steps=${1:-60}
out=runs/peer-study
mkdir -p "$out"
common=(--set data.path=data/kjv.h5 --set train.steps="$steps" --set train.warmup_steps=10
  --set train.global_batch=8 --set train.micro_batch=4 --set train.eval_every=0
  --set train.eval_batches=4 --set checkpoint.every=0 --set log.every=20)
run() {
  local name=$1
  shift
  mpirun -np 2 build/bin/moe-train --config examples/configs/small.yaml "${common[@]}" \
    --set run.dir="$out/$name" --set checkpoint.dir="$out/$name/ck" \
    --metrics "$out/$name.jsonl" "$@" >"$out/$name.log" 2>&1
  rm -rf "$out/$name/ck"  # the N = 1024^2 tables make multi-GiB checkpoints
}
peer=(--set model.moe.kind=peer --set model.peer.heads=8 --set model.peer.top_k=16
  --set model.peer.d_key=128)
run dense --set model.moe.every_n_layers=0
run top2 --set model.moe.every_n_layers=3
run peer256 "${peer[@]}" --set model.peer.n_sub_keys=256
run peer1024 "${peer[@]}" --set model.peer.n_sub_keys=1024
/usr/bin/python3 - "$out" <<'PY'
import json, sys
print("| middle block | val loss | usage | unevenness KL | tokens/s | PEER bytes/token |")
print("|---|---|---|---|---|---|")
names = {"dense": "dense FFN (d_ff 2048)", "top2": "MoE 8 experts top-2 (d_ff 1024)",
         "peer256": "PEER N = 256^2", "peer1024": "PEER N = 1024^2"}
for name, label in names.items():
    recs = [json.loads(l) for l in open(f"{sys.argv[1]}/{name}.jsonl")]
    s = [r for r in recs if r.get("summary")][-1]
    last = [r for r in recs if "step" in r and not r.get("summary")][-1]
    if name.startswith("peer"):
        usage, kl = f"{last['peer_usage']:.3f}", f"{last['peer_kl']:.3f}"
        b = f"{last['peer_bytes_per_token']:.0f}"
    elif name == "top2":
        usage, kl, b = f"{8 - s['dead_experts']}/8 experts", f"{s['router_kl']:.4f} (router)", "-"
    else:
        usage, kl, b = "-", "-", "-"
    print(f"| {label} | {s['val_loss']:.4f} | {usage} | {kl} | {s['tokens_per_s']:.0f} | {b} |")
PY
