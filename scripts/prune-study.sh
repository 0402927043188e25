#!/usr/bin/env bash
# prune-study.sh [STEPS] [FT_STEPS] — the moe-prune (UNCURL) study of docs/results.md, on 2 ranks.
#   data      the last 10% of the lines of each bundled corpus (data/kjv.txt, data/fortunes.txt)
#             is held out as a "task" file (moe-data, byte tokens, half train / half val); the
#             other 90% of both make the pretraining file
#   pretrain  examples/configs/prune-study.yaml (32 experts top-2, 2 blocks, d_model 128) for
#             STEPS steps (default 300)
#   prune     per task (kjv, fortunes), per factor 2, 4, 8, 16 (32 -> 16, 8, 4, 2 experts), per
#             method (merge, merge-noalign, frequency): moe-prune profiles 8192 tokens of the
#             task's train split and reports the task loss on 8192 tokens of its val split, and
#             the All2All per decode step (8 sequences on rank 0) for 8, 4, 2 and 1 ranks
#   fine-tune merge and frequency: FT_STEPS (default 40; 0 skips) more steps on the task's train
#             split (moe-train --resume, constant lr 3e-4), then the same val loss
#   scratch   the same model with 16, 8, 4, 2 experts trained from scratch on the pretraining
#             file for STEPS + FT_STEPS steps (as many as the fine-tuned pruned models in all)
#   serving   moe-bench decode --checkpoint (batch 8, greedy) on the pretrained and the merged
#             (kjv) checkpoints, on 2 ranks and on 1 rank (1 x 2 threads)
# Prints markdown tables (task val loss per method and factor, the threshold factor, traffic
# and decode throughput); everything lands in $OUT (default runs/prune-study/). BIN overrides
# build/bin (e.g. a copy, so that rebuilding meanwhile does not change the binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
steps=${1:-300}
ft=${2:-40}
out=${OUT:-runs/prune-study}
bin=${BIN:-build/bin}
mkdir -p "$out/data"
t_start=$(date +%s)
phase() { echo "[$(($(date +%s) - t_start)) s] $*"; }

# -- data: pretraining file and the two held-out task files
bash scripts/export-corpus.sh data >/dev/null
for src in kjv fortunes; do
  n=$(wc -l <"data/$src.txt")
  head -n $((n * 9 / 10)) "data/$src.txt" >"$out/data/${src}_pre.txt"
  tail -n +$((n * 9 / 10 + 1)) "data/$src.txt" >"$out/data/${src}_task.txt"
  [ -s "$out/data/$src.h5" ] || "$bin/moe-data" build --input "$out/data/${src}_task.txt" \
    --output "$out/data/$src.h5" --val-fraction 0.5 >/dev/null
done
[ -s "$out/data/pretrain.h5" ] || "$bin/moe-data" build --input "$out/data/kjv_pre.txt" \
  "$out/data/fortunes_pre.txt" --output "$out/data/pretrain.h5" >/dev/null
phase "data ready"

# Each step is skipped when its log shows it finished, so a re-run only does what is missing.
train() {  # train NAME ARGS...: moe-train on 2 ranks into $out/NAME
  local name=$1
  shift
  grep -qs '"summary":true' "$out/$name.jsonl" && return 0
  mpirun -np 2 "$bin/moe-train" --config examples/configs/prune-study.yaml \
    --set run.dir="$out/$name" --set checkpoint.dir="$out/$name/ck" \
    --set data.path="$out/data/pretrain.h5" --metrics "$out/$name.jsonl" "$@" >"$out/$name.log" 2>&1 ||
    { tail -n 20 "$out/$name.log"; exit 1; }
}
train pre32 --set train.steps="$steps"
phase "pretrained 32 experts ($steps steps)"

prune() {  # prune NAME CHECKPOINT TASK TARGET METHOD
  grep -qs "^wrote " "$out/$1.log" && return 0
  mpirun -np 2 "$bin/moe-prune" --checkpoint "$2" --task-data "$out/data/$3.h5" \
    --target-experts "$4" --method "$5" --tokens 8192 --decode-tokens 8 --traffic-ranks 8 \
    --eval --eval-split val --output "$out/$1" >"$out/$1.log" 2>&1 ||
    { tail -n 20 "$out/$1.log"; exit 1; }
}
for task in kjv fortunes; do
  for e in 16 8 4 2; do
    for method in merge merge-noalign frequency; do
      prune "p-$task-$method-$e" "$out/pre32/ck" "$task" "$e" "$method"
    done
  done
  prune "p-$task-none-32" "$out/pre32/ck" "$task" 32 frequency  # the unpruned model's loss
done
phase "pruned (2 tasks x 4 factors x 3 methods)"

if [ "$ft" -gt 0 ]; then
  for task in kjv fortunes; do
    # the unpruned model fine-tuned alike: the reference for the fine-tuned columns
    train "ft-$task-32" --resume "$out/pre32/ck" --set data.path="$out/data/$task.h5" \
      --set train.steps=$((steps + ft)) --set train.lr=3e-4 --set train.min_lr=3e-4 \
      --set train.warmup_steps=0
    prune "e-ft-$task-32" "$out/ft-$task-32/ck" "$task" 32 frequency
    for e in 16 8 4 2; do
      for method in merge frequency; do
        name=ft-$task-$e$([ $method = merge ] || echo "-$method")
        train "$name" --resume "$out/p-$task-$method-$e" --set model.moe.num_experts="$e" \
          --set data.path="$out/data/$task.h5" --set train.steps=$((steps + ft)) \
          --set train.lr=3e-4 --set train.min_lr=3e-4 --set train.warmup_steps=0
        prune "e-$name" "$out/$name/ck" "$task" "$e" frequency  # E' = E: the model as it is
      done
    done
  done
  phase "fine-tuned the merged and the frequency-pruned models ($ft steps)"
fi

for e in 16 8 4 2; do
  train "scratch$e" --set model.moe.num_experts="$e" --set train.steps=$((steps + ft))
  for task in kjv fortunes; do
    prune "e-scratch$e-$task" "$out/scratch$e/ck" "$task" "$e" frequency
  done
done
phase "trained from scratch (16, 8, 4, 2 experts, $((steps + ft)) steps)"

bench() {  # bench NAME CHECKPOINT RANKS
  grep -qs '"bench":"decode"' "$out/$1.log" && return 0
  mpirun -np "$3" "$bin/moe-bench" decode --checkpoint "$2" --batch 8 --samples 3 \
    --new-tokens 32 --json >"$out/$1.log" 2>&1 || { tail -n 20 "$out/$1.log"; exit 1; }
}
for ranks in 2 1; do
  bench "b-32-np$ranks" "$out/pre32/ck" "$ranks"
  for e in 16 8 4 2; do bench "b-$e-np$ranks" "$out/p-kjv-merge-$e" "$ranks"; done
done
phase "decode benchmarks"

/usr/bin/python3 - "$out" "$ft" <<'PY'
import json, re, sys
out, ft = sys.argv[1], int(sys.argv[2])
factors = [(2, 16), (4, 8), (8, 4), (16, 2)]
methods = ["merge", "merge-noalign", "frequency"]
def log(name):
    return open(f"{out}/{name}.log").read()
def loss(name, which="after"):
    m = re.search(rf"task loss {which} \(val split\): ([0-9.]+)", log(name))
    return float(m.group(1))
def traffic(name, model, ranks):  # (messages, remote bytes) on `ranks` of the traffic table
    rows = [l.split() for l in log(name).splitlines()]
    rows = [f for f in rows if len(f) == 6 and f[0] in ("before", "after")]
    # pairs (before, after) for 8, 4, 2, 1 ranks (--traffic-ranks 8)
    f = rows[2 * [8, 4, 2, 1].index(ranks) + (model == "after")]
    return int(f[3]), float(f[5])
def tps(name):
    j = [json.loads(l) for l in log(name).splitlines() if l.startswith("{")][-1]
    return j["per_batch"][0]["decode_tokens_per_s"]
TOL = 0.05  # quality holds while the val loss is within 5% of the unpruned model's
for task in ["kjv", "fortunes"]:
    base = loss(f"p-{task}-none-32", "before")
    base_ft = loss(f"e-ft-{task}-32", "before") if ft else None
    note = f"; fine-tuned alike: {base_ft:.4f}" if ft else ""
    print(f"\n**Task {task}** (val loss in nats per byte; unpruned 32 experts: {base:.4f}{note})\n")
    cols = ["factor", "experts"] + methods
    cols += ["merge + fine-tune", "frequency + fine-tune"] if ft else []
    cols += ["from scratch"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for fac, e in factors:
        row = [f"{fac}", f"{e}"] + [f"{loss(f'p-{task}-{m}-{e}'):.4f}" for m in methods]
        if ft:
            row.append(f"{loss(f'e-ft-{task}-{e}', 'before'):.4f}")
            row.append(f"{loss(f'e-ft-{task}-{e}-frequency', 'before'):.4f}")
        row.append(f"{loss(f'e-scratch{e}-{task}', 'before'):.4f}")
        print("| " + " | ".join(row) + " |")
    def threshold(name, ref):  # name(e) -> run; the largest factor within TOL of ref
        ok = None
        for fac, e in factors:
            if loss(*name(e)) > ref * (1 + TOL):
                break
            ok = fac
        return ok if ok else "none (already at factor 2)"
    th = [f"{m} {threshold(lambda e: (f'p-{task}-{m}-{e}',), base)}" for m in methods]
    print(f"\nthreshold factor (largest with val loss within {TOL:.0%} of unpruned): " + ", ".join(th))
    if ft:
        th = [f"{m} + fine-tune {threshold(lambda e: (f'e-ft-{task}-{e}{sfx}', 'before'), base_ft)}"
              for m, sfx in [("merge", ""), ("frequency", "-frequency")]]
        print(f"after fine-tuning (within {TOL:.0%} of the unpruned model fine-tuned alike): "
              + ", ".join(th))
print("\n**All2All per decode step and decode throughput** (task kjv, merge; 8 sequences on rank 0; "
      "2 MoE layers; remote bytes expected from the task's routing)\n")
print("| experts | messages, 8 ranks | remote KB, 8 ranks | messages, 2 ranks | remote KB, 2 ranks "
      "| decode tokens/s, 2 ranks | decode tokens/s, 1 rank |")
print("|---|---|---|---|---|---|---|")
rows = [(32, "p-kjv-merge-16", "before", "b-32")] + [
    (e, f"p-kjv-merge-{e}", "after", f"b-{e}") for _, e in factors]
for e, name, model, b in rows:
    m8, r8 = traffic(name, model, 8)
    m2, r2 = traffic(name, model, 2)
    print(f"| {e} | {m8} | {r8 / 1e3:.1f} | {m2} | {r2 / 1e3:.1f} | {tps(b + '-np2'):.0f} | "
          f"{tps(b + '-np1'):.0f} |")
PY
phase "done"
