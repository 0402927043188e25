#!/usr/bin/env bash
# Serving benchmark, everything back to back on this machine, one table at the end:
#   1. engine decode without HTTP (moe-bench decode, batch 1, 8, 32) on 2 ranks x 1 thread,
#      1 rank x 2 threads and 1 rank x 1 thread, each with its step time against the memory
#      bandwidth limit (bytes of the step's active weights at the bandwidth measured in the run);
#   2. HTTP: moe-serve on 2 ranks (--max-batch 128) with a checkpoint of the same model
#      (examples/configs/small.yaml = the reference's default decode model, 2 training steps),
#      examples/serve-bench.py at concurrency 1, 8, 32 and 128 (greedy, 32-byte prompt, 64
#      tokens, at least 2 requests per client slot);
#   3. the PyTorch reference: torch_reference.py decode --batch 1,8,32 (2 threads).
# Ratios: engine / PyTorch decode tokens/s per batch (targets >= 3x at batch 1, >= 2x at 32),
# HTTP concurrency 32 / PyTorch batch 32 (target >= 1.5x), HTTP concurrency 32 and 128 / 1
# (target >= 5x).
#   scripts/bench-serve.sh            env: SAMPLES (5), REQUESTS (64), TORCH_REFERENCE,
#                                     WEIGHTS (fp32; bf16: --weights bf16 for the engine and
#                                     the server), TABLE_ONLY=1 (the table of the last run in
#                                     runs/bench-serve)
# Open MPI ranks yield the core while they wait (mpi_yield_when_idle): on a machine shared with
# other work, busy-polling ranks otherwise burn the time slices their peers need.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
bin=${BUILD_DIR:-build}/bin
ref=${TORCH_REFERENCE:-../shared/bench/torch_reference.py}
[ -f "$ref" ] || ref=/work/shared/bench/torch_reference.py
SAMPLES=${SAMPLES:-5}
REQUESTS=${REQUESTS:-64}
WEIGHTS=${WEIGHTS:-fp32}
out=runs/bench-serve$([ "$WEIGHTS" = fp32 ] || echo "-$WEIGHTS")
if [ "${TABLE_ONLY:-0}" = 0 ]; then  # TABLE_ONLY=1: print the table of the last run again
rm -rf "$out"
mkdir -p "$out"
echo "# $(date -Is) load average: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== engine decode (moe-bench decode) =="
mpirun -np 2 "$bin/moe-bench" decode --samples "$SAMPLES" --weights "$WEIGHTS" --json | tee "$out/engine_2x1.txt" | sed '$d'
"$bin/moe-bench" decode --threads 2 --samples "$SAMPLES" --weights "$WEIGHTS" --json | tee "$out/engine_1x2.txt" | sed '$d'
"$bin/moe-bench" decode --threads 1 --samples "$SAMPLES" --weights "$WEIGHTS" --json | tee "$out/engine_1x1.txt" | sed '$d'

echo "== HTTP (moe-serve np 2 + examples/serve-bench.py) =="
[ -s data/kjv.h5 ] || { bash scripts/export-corpus.sh data >/dev/null; "$bin/moe-data" build --input data/kjv.txt --output data/kjv.h5 >/dev/null; }
mpirun -np 2 "$bin/moe-train" --config examples/configs/small.yaml --set train.steps=2 \
  --set train.eval_every=0 --set train.eval_batches=1 --set checkpoint.every=2 \
  --set run.dir="$out/train" --set checkpoint.dir="$out/ck" --set log.every=1000 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mpirun -np 2 "$bin/moe-serve" --checkpoint "$out/ck" --port "$port" --max-batch 128 \
  --max-context 96 --weights "$WEIGHTS" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { tail -n 5 "$out/serve.log"; exit 1; }
  sleep 0.25
done
python3 examples/serve-bench.py --url "http://127.0.0.1:$port" --concurrency 1 8 32 128 \
  --requests "$REQUESTS" --max-tokens 64 --prompt "In the beginning God created the" --json \
  | tee "$out/http.jsonl"
curl -sf "http://127.0.0.1:$port/metrics" >"$out/metrics.json"
kill -TERM $server
wait $server || true
trap - EXIT

echo "== PyTorch reference (torch_reference.py decode) =="
/usr/bin/python3 "$ref" decode --batch 1,8,32 --samples "$SAMPLES" --json | tee "$out/torch.txt" | sed '$d'
echo "# $(date -Is) load average: $(cut -d' ' -f1-3 /proc/loadavg)"
fi

/usr/bin/python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
last = lambda f: json.loads(open(f"{d}/{f}").read().strip().split("\n")[-1])
t = last("torch.txt")
torch = {r["batch"]: r for r in t.get("decode", t)["per_batch"]}
tt = lambda b: torch[b]["decode_tokens_per_s"]["median"]
print("\nengine decode (no HTTP), generated tokens/s; x = ratio to PyTorch; limit = step / "
      "(active weights at the measured bandwidth)")
print(f"{'batch':>5} {'PyTorch':>10} | " + " | ".join(f"{n:>28}" for n in ("2 ranks x 1 thread",
      "1 rank x 2 threads", "1 rank x 1 thread")))
runs = [last(f) for f in ("engine_2x1.txt", "engine_1x2.txt", "engine_1x1.txt")]
for b in sorted(torch):
    cells = []
    for r in runs:
        e = {x["batch"]: x for x in r["per_batch"]}[b]
        cells.append(f"{e['decode_tokens_per_s']:8.0f} {e['decode_tokens_per_s'] / tt(b):5.2f}x "
                     f"{e['ms_per_step']:6.2f}ms {e['limit_ratio']:4.1f}L")
    print(f"{b:5d} {tt(b):10.0f} | " + " | ".join(f"{c:>28}" for c in cells))
print("bandwidth GB/s: " + ", ".join(f"{r['bandwidth_gbs']:.1f}" for r in runs))
http = [json.loads(l) for l in open(f"{d}/http.jsonl") if l.startswith("{")]
print("\nHTTP (moe-serve, 2 ranks), greedy, 64 tokens per request")
print(f"{'conc':>5} {'tokens/s':>10} {'ttft p50':>9} {'ttft p99':>9} {'tok p50':>8} {'tok p99':>8} {'errors':>6}")
for h in http:
    print(f"{h['concurrency']:5d} {h['tokens_per_s']:10.0f} {h['ttft_ms_p50']:7.1f}ms {h['ttft_ms_p99']:7.1f}ms "
          f"{h['token_ms_p50']:6.2f}ms {h['token_ms_p99']:6.2f}ms {h['errors']:6d}")
by = {h["concurrency"]: h["tokens_per_s"] for h in http}
summary = {"engine_2x1_vs_torch_b1": runs[0]["per_batch"][0]["decode_tokens_per_s"] / tt(1),
           "engine_2x1_vs_torch_b32": runs[0]["per_batch"][-1]["decode_tokens_per_s"] / tt(32),
           "engine_1x1_vs_torch_b1": runs[2]["per_batch"][0]["decode_tokens_per_s"] / tt(1),
           "engine_1x1_vs_torch_b32": runs[2]["per_batch"][-1]["decode_tokens_per_s"] / tt(32),
           "http_c32_vs_torch_b32": by.get(32, 0) / tt(32),
           "http_c32_vs_c1": by.get(32, 0) / by[1] if by.get(1) else 0,
           "http_c128_vs_c1": by.get(128, 0) / by[1] if by.get(1) else 0}
# The most any server could generate per second on this workload at concurrency C, from the
# engine run's own measurements (2 ranks x 1 thread, batch 32; its prompt and length equal the
# HTTP requests'): each wave of C requests prefills C prompts at the FMA peak, then runs
# new_tokens - 1 decode steps, each at least its weights + KV cache read once at the measured
# bandwidth or its FLOPs at the peak, whichever is longer (perfect overlap). Batch C scales the
# KV bytes and FLOPs of batch 32; the weights read stay all the experts.
e = runs[0]
e32 = {x["batch"]: x for x in e["per_batch"]}[32]
peak, bw = e["peak_gflops"] * 1e9, e["bandwidth_gbs"] * 1e9
def ceiling(c):
    prefill = c * e["prompt_len"] * e["prefill_flops_per_token"] / peak
    memory = (e32["active_bytes"] + e32["kv_bytes"] * c / 32) / bw
    compute = c * e32["flops_per_token"] / peak
    return c * e["new_tokens"] / (prefill + (e["new_tokens"] - 1) * max(memory, compute))
print(f"\nceiling at {e['peak_gflops']:.0f} GFLOP/s and {e['bandwidth_gbs']:.1f} GB/s, "
      "no overheads (generated tokens/s, and over HTTP concurrency 1):")
for c in (32, 128):
    if by.get(1):
        summary[f"ceiling_c{c}_vs_c1"] = ceiling(c) / by[1]
    print(f"  concurrency {c:3d}: {ceiling(c):8.0f} tokens/s, {ceiling(c) / by.get(1, float('nan')):.2f}x"
          f" (measured {by.get(c, 0) / by.get(1, float('nan')):.2f}x)")
print("\n" + "  ".join(f"{k} {v:.2f}" for k, v in summary.items()))
print("targets: engine >= 3x PyTorch at batch 1, >= 2x at 32; HTTP c32 >= 1.5x PyTorch b32; batching >= 5x c1")
print(json.dumps({"bench": "serve", **summary}))
PY
