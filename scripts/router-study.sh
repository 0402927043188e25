#!/usr/bin/env bash
# router-study.sh [STEPS] — the router comparison of docs/results.md: examples/configs/small.yaml
# (8 experts top-2, or the dense baseline small-dense.yaml with the same active parameters) for
# STEPS steps (default 60) on 2 ranks, once per router, then a markdown table of the summaries:
# validation loss, mean max/mean expert load, dead experts, router KL, tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
steps=${1:-60}
out=runs/router-study
mkdir -p "$out"
common=(--set data.path=data/kjv.h5 --set train.steps="$steps" --set train.warmup_steps=10
  --set train.eval_every=0 --set checkpoint.every=0 --set log.every=20)
run() {
  local name=$1 config=$2
  shift 2
  mpirun -np 2 build/bin/moe-train --config "examples/configs/$config" "${common[@]}" \
    --set run.dir="$out/$name" --set checkpoint.dir="$out/$name/ck" \
    --metrics "$out/$name.jsonl" "$@" >"$out/$name.log" 2>&1
}
run topk_aux small.yaml --set model.moe.router=topk
run topk_bias small.yaml --set model.moe.router=topk_bias
run expert_choice small.yaml --set model.moe.router=expert_choice
run dense small-dense.yaml
/usr/bin/python3 - "$out" <<'PY'
import json, sys
print("| router | val loss | expert imbalance (mean max/mean) | dead experts | router KL | tokens/s |")
print("|---|---|---|---|---|---|")
for name in ["topk_aux", "topk_bias", "expert_choice", "dense"]:
    s = [json.loads(l) for l in open(f"{sys.argv[1]}/{name}.jsonl") if '"summary"' in l][-1]
    moe = name != "dense"
    f = lambda k, fmt: format(s[k], fmt) if moe else "-"
    print(f"| {name} | {s['val_loss']:.4f} | {f('expert_imbalance_mean', '.2f')} | "
          f"{f('dead_experts', 'd')} | {f('router_kl', '.4f')} | {s['tokens_per_s']:.0f} |")
PY
