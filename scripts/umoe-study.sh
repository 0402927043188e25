#!/usr/bin/env bash
# umoe-study.sh [STEPS] — the UMoE comparison of docs/results.md, on 2 ranks for STEPS steps
# (default 30) of examples/configs/small.yaml (8 experts of width 1024, top-2, every block):
#   dense       every_n_layers 0, model.d_ff 8192 (the FFN-MoE model's total parameters)
#   ffn_moe     small.yaml as it is (MHA + MoE FFN)
#   umoe_att    UMoE attention (own 8 experts, top-2) + a dense FFN of width 384
#   umoe_shared UMoE attention + MoE FFN on the same 8 experts
# UMoE: d_qk 64, query rank 16, no shared expert (to keep the totals near ffn_moe's). Prints
# a markdown table: total parameters (from the final checkpoint), validation loss, tokens/s,
# exchange fraction, and compute time per step relative to ffn_moe.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
steps=${1:-30}
out=runs/umoe-study
mkdir -p "$out"
common=(--set data.path=data/kjv.h5 --set train.steps="$steps" --set train.warmup_steps=10
  --set train.eval_every=0 --set checkpoint.every=0 --set log.every=10)
umoe=(--set model.attention=umoe --set model.umoe.d_qk=64 --set model.umoe.query_rank=16
  --set model.umoe.shared_experts=0 --set model.umoe.top_k=2)
run() {
  local name=$1
  shift
  mpirun -np 2 build/bin/moe-train --config examples/configs/small.yaml "${common[@]}" \
    --set run.dir="$out/$name" --set checkpoint.dir="$out/$name/ck" \
    --metrics "$out/$name.jsonl" "$@" >"$out/$name.log" 2>&1
}
run dense --set model.moe.every_n_layers=0 --set model.d_ff=8192
run ffn_moe
run umoe_att "${umoe[@]}" --set model.moe.every_n_layers=0 --set model.d_ff=384
run umoe_shared "${umoe[@]}" --set model.moe.share_attention_ffn=true
/usr/bin/python3 - "$out" <<'PY'
import json, sys, h5py
out = sys.argv[1]
def params(name):  # every tensor under /model of the final checkpoint (dense + experts)
    step = open(f"{out}/{name}/ck/latest").read().strip()
    f = h5py.File(f"{out}/{name}/ck/{step}/model.h5", "r")
    n = 0
    def visit(_, obj):
        nonlocal n
        if isinstance(obj, h5py.Dataset): n += obj.size
    f["/model"].visititems(visit)
    return n
rows = {}
for name in ["dense", "ffn_moe", "umoe_att", "umoe_shared"]:
    s = [json.loads(l) for l in open(f"{out}/{name}.jsonl") if '"summary"' in l][-1]
    rows[name] = s
base = 1.0 / rows["ffn_moe"]["tokens_per_s"]
print("| model | parameters | val loss | tokens/s | exchange fraction | time/token vs ffn_moe |")
print("|---|---|---|---|---|---|")
for name, s in rows.items():
    print(f"| {name} | {params(name) / 1e6:.2f} M | {s['val_loss']:.4f} | {s['tokens_per_s']:.0f} | "
          f"{s.get('exchange_fraction', 0):.2f} | {(1.0 / s['tokens_per_s']) / base:.2f}x |")
PY
