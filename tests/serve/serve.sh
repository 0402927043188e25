#!/usr/bin/env bash
# serve.sh — moe-serve under mpirun -np 2, queried with curl on 127.0.0.1 (a free port):
#   - a greedy completion equals moe-generate --temperature 0 on 1 and on 2 ranks (exact text);
#   - the same completion streamed (server-sent events) concatenates to the same text;
#   - bad requests (malformed JSON, missing and wrongly typed fields, a prompt longer than the
#     context, max_tokens beyond the limit, an unknown path, a stream the client drops) get a
#     4xx with a JSON error, and the server keeps serving;
#   - 64 concurrent greedy clients all get the reference text; /healthz and /metrics answer;
#   - a sampled completion (temperature 0.8, top_k, top_p, seed) equals moe-generate's with the
#     same options (same per-request generator);
#   - a second server on the same port exits non-zero naming the port;
#   - SIGTERM to the server (rank 0) drains and ends every rank: mpirun exits 0 within 30 s.
#     (A SIGTERM to mpirun itself reaches every rank too and they stop the same way, but
#     Open MPI's mpirun then reports 1 for a signalled job.)
#   - --weights bf16: the server's greedy text equals moe-generate --weights bf16 on 2 ranks
#     (both round the same weights); --weights fp16 is refused with a clear error.
# Environment as for tests/train (lib.sh), plus MOE_SERVE and MOE_GENERATE (the binaries).
source "$MOE_TESTS/lib.sh"
: "${MOE_SERVE:?}" "${MOE_GENERATE:?}"

CK=$S/tiny/ck
PROMPT="In the beginning"
N=24
source "$(dirname "$0")/serve_lib.sh"
train 2 tiny --set train.steps=300 --set checkpoint.every=300

generated greedy_np1 1 --max-tokens $N --temperature 0
generated greedy_np2 2 --max-tokens $N --temperature 0
generated sampled_np2 2 --max-tokens $N --temperature 0.8 --top-k 20 --top-p 0.9 --seed 5
cmp -s "$S/greedy_np1.txt" "$S/greedy_np2.txt" || fail "moe-generate greedy differs on 1 and 2 ranks"
cp "$S/greedy_np2.txt" "$S/reference.txt"

start_server 2 --max-batch 4

GREEDY="{\"prompt\": \"$PROMPT\", \"max_tokens\": $N, \"temperature\": 0}"
check_greedy

# Bad requests: 4xx with a JSON error naming the problem; the server keeps serving.
LONG=$(python3 -c 'print("x" * 5000)')
bad() {
  local want=$1 regex=$2 body=$3
  shift 3
  local out
  out=$(post "$body" "$@")
  [ "${out%% *}" = "$want" ] || fail "expected $want for $body: $out"
  echo "${out#* }" | python3 -c 'import json,sys; e=json.load(sys.stdin)["error"]; assert e["message"]' ||
    fail "no JSON error for $body: $out"
  echo "${out#* }" | grep -qE "$regex" || fail "error for $body does not match '$regex': $out"
  alive "$body"
  echo "+ $want: ${out#* }"
}
bad 400 "malformed JSON" '{"prompt": "In the'
bad 400 "malformed JSON" ''
bad 400 "must be a JSON object" '[1, 2]'
bad 400 "missing field 'prompt'" '{"max_tokens": 4}'
bad 400 "'prompt' must be a string" '{"prompt": 42}'
bad 400 "'max_tokens' must be an integer" '{"prompt": "a", "max_tokens": "ten"}'
bad 400 "'temperature' must be a number" '{"prompt": "a", "temperature": "hot"}'
bad 400 "'stream' must be a boolean" '{"prompt": "a", "stream": "yes"}'
bad 400 "'top_p'" '{"prompt": "a", "top_p": 0}'
bad 400 "'stop' must be" '{"prompt": "a", "stop": [1]}'
bad 400 "the prompt is [0-9]+ tokens; the context holds" "{\"prompt\": \"$LONG\"}"
bad 400 "max_tokens = 100000 exceeds the limit" '{"prompt": "a", "max_tokens": 100000}'
code=$(curl -s -m 5 -o "$S/resp.json" -w '%{http_code}' "$URL/v1/nowhere")
[ "$code" = 404 ] && grep -q '"error"' "$S/resp.json" || fail "unknown path: $code $(cat "$S/resp.json")"
# A client that drops a stream after 0.05 s (whether or not it had finished).
curl -sN -m 0.05 -X POST --data-binary '{"prompt": "a", "max_tokens": 60, "stream": true}' \
  "$URL/v1/completions" >/dev/null 2>&1
alive "a dropped stream"

# 64 concurrent greedy clients (the server's batch is 4): each gets the reference text.
concurrent_greedy 64
# Sampled: the same tokens as moe-generate with the same seed and options.
out=$(post "{\"prompt\": \"$PROMPT\", \"max_tokens\": $N, \"temperature\": 0.8, \"top_k\": 20, \"top_p\": 0.9, \"seed\": 5}")
[ "${out%% *}" = 200 ] || fail "sampled completion: $out"
python3 - "$S/resp.json" "$S/sampled_np2.txt" <<'PY' || fail "sampled text differs from moe-generate"
import json, sys
got = json.load(open(sys.argv[1]))["choices"][0]["text"]
want = open(sys.argv[2], encoding="utf-8").read()
assert got == want, (got, want)
print("+ sampled text equals moe-generate:", repr(got))
PY
# A few more sampled ones (other seeds, a stop string): they succeed.
for i in 1 2 3; do
  out=$(post "{\"prompt\": \"$PROMPT\", \"max_tokens\": 8, \"temperature\": 0.8, \"top_k\": 20, \"top_p\": 0.9, \"seed\": $i, \"stop\": [\"\\n\"]}")
  [ "${out%% *}" = 200 ] || fail "sampled completion: $out"
done

curl -sf -m 5 "$URL/metrics" >"$S/metrics.json" || fail "/metrics"
python3 - "$S/metrics.json" <<'PY' || fail "/metrics content: $(cat "$S/metrics.json")"
import json, sys
m = json.load(open(sys.argv[1]))
for k in ("requests", "tokens_generated", "queue_length", "batch_size", "step_seconds_last",
          "step_seconds_mean", "all2all_seconds_total", "requests_rejected"):
    assert k in m, k
assert m["requests"] >= 69 and m["tokens_generated"] >= 66 * 24, m
assert m["requests_rejected"] >= 12, m
load = m["expert_load"]  # [MoE layers][experts] routed slots, cumulative
assert load and len(load) == len(m["expert_load_blocks"]), m
assert len({sum(row) for row in load}) == 1 and sum(load[0]) > 0, load
print("+ metrics:", json.dumps(m))
PY

# A second server on the same port fails on every rank with one clear line, and the first
# keeps serving.
if timeout 60 "${MPIRUN[@]}" -np 2 "$MOE_SERVE" --checkpoint "$CK" --port "$PORT" \
  >"$S/second.log" 2>&1; then
  fail "a second moe-serve on port $PORT started"
fi
grep -q "error: config: rank 0: moe-serve: cannot listen on 127.0.0.1:$PORT" "$S/second.log" ||
  fail "second server: $(tail -n 3 "$S/second.log")"
alive "a second server on the same port"
echo "+ a second server on port $PORT: refused"

stop_server

# Weight-only bf16: moe-generate rounds the attention and expert weights, the server also packs
# them in bf16; the greedy text is the same.
generated greedy_bf16 2 --max-tokens $N --temperature 0 --weights bf16
cp "$S/greedy_bf16.txt" "$S/reference.txt"
cmp -s "$S/greedy_bf16.txt" "$S/greedy_np2.txt" && echo "+ bf16 greedy text: the same as fp32's" ||
  echo "+ bf16 greedy text differs from fp32's"
start_server 2 --max-batch 4 --weights bf16
grep -q "weights bf16" "$S/serve.log" || fail "no 'weights bf16' in the banner: $(tail -n 3 "$S/serve.log")"
check_greedy
stop_server
if timeout 60 "${MPIRUN[@]}" -np 2 "$MOE_SERVE" --checkpoint "$CK" --weights fp16 \
  >"$S/badweights.log" 2>&1; then
  fail "moe-serve --weights fp16 started"
fi
grep -q "error: .*weights 'fp16': expected fp32 or bf16" "$S/badweights.log" ||
  fail "--weights fp16: $(tail -n 3 "$S/badweights.log")"
echo "+ --weights fp16: refused"
echo "PASS"
