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
# Environment as for tests/train (lib.sh), plus MOE_SERVE and MOE_GENERATE (the binaries).
source "$MOE_TESTS/lib.sh"
: "${MOE_SERVE:?}" "${MOE_GENERATE:?}"

SERVER_PID=""
cleanup() {  # mpirun forwards SIGTERM to its ranks; SIGKILL if it is still there after 5 s
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
  fi
}
trap cleanup EXIT

train 2 tiny --set train.steps=300 --set checkpoint.every=300
CK=$S/tiny/ck
PROMPT="In the beginning"
N=24

# The reference texts from moe-generate (what follows the prompt after the header line).
generated() {  # NAME NP ARGS...: the continuation into $S/NAME.txt
  local name=$1 np=$2
  shift 2
  timeout 60 "${MPIRUN[@]}" -np "$np" "$MOE_GENERATE" --checkpoint "$CK" --prompt "$PROMPT" \
    "$@" >"$S/$name.out" 2>&1 || fail "moe-generate np $np: $(tail -n 5 "$S/$name.out")"
  python3 - "$S/$name.out" "$PROMPT" "$S/$name.txt" <<'PY' || fail "moe-generate output $name"
import sys
out = open(sys.argv[1], encoding="utf-8", errors="surrogateescape").read()
body = out.split("]\n", 1)[1]
assert body.startswith(sys.argv[2]), body
open(sys.argv[3], "w", encoding="utf-8", errors="surrogateescape").write(body[len(sys.argv[2]):-1])
PY
}
generated greedy_np1 1 --max-tokens $N --temperature 0
generated greedy_np2 2 --max-tokens $N --temperature 0
generated sampled_np2 2 --max-tokens $N --temperature 0.8 --top-k 20 --top-p 0.9 --seed 5
cmp -s "$S/greedy_np1.txt" "$S/greedy_np2.txt" || fail "moe-generate greedy differs on 1 and 2 ranks"
cp "$S/greedy_np2.txt" "$S/reference.txt"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
"${MPIRUN[@]}" -np 2 "$MOE_SERVE" --checkpoint "$CK" --host 127.0.0.1 --port "$PORT" \
  --max-batch 4 >"$S/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
  curl -sf "$URL/healthz" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "moe-serve exited early: $(tail -n 5 "$S/serve.log")"
  sleep 0.25
done
curl -sf "$URL/healthz" | grep -q '"ok"' || fail "/healthz not ok: $(tail -n 5 "$S/serve.log")"
echo "+ moe-serve np 2 on $URL"

# post BODY [CURL_ARGS...] -> prints "STATUS BODY"
post() {
  local body=$1
  shift
  curl -s -m 30 -o "$S/resp.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    -X POST --data-binary "$body" "$@" "$URL/v1/completions"
  echo -n " "
  cat "$S/resp.json"
}
alive() { curl -sf -m 5 "$URL/healthz" >/dev/null || fail "server down after $1"; }

GREEDY="{\"prompt\": \"$PROMPT\", \"max_tokens\": $N, \"temperature\": 0}"
out=$(post "$GREEDY")
[ "${out%% *}" = 200 ] || fail "greedy completion: $out"
python3 - "$S/resp.json" "$S/reference.txt" <<'PY' || fail "server text differs from moe-generate"
import json, sys
r = json.load(open(sys.argv[1]))
want = open(sys.argv[2], encoding="utf-8").read()
got = r["choices"][0]["text"]
assert got == want, (got, want)
assert r["choices"][0]["finish_reason"] == "length"
assert r["usage"]["completion_tokens"] == len(r["choices"][0]["token_ids"]) == 24
print("+ greedy text equals moe-generate:", repr(got))
PY

# Streamed: one event per token, a finish event, then [DONE].
curl -sN -m 30 -H 'Content-Type: application/json' -X POST \
  --data-binary "{\"prompt\": \"$PROMPT\", \"max_tokens\": $N, \"temperature\": 0, \"stream\": true}" \
  "$URL/v1/completions" >"$S/stream.txt" || fail "stream request failed"
python3 - "$S/stream.txt" "$S/reference.txt" <<'PY' || fail "streamed text differs"
import json, sys
lines = [l[6:] for l in open(sys.argv[1]).read().split("\n") if l.startswith("data: ")]
assert lines[-1] == "[DONE]", lines[-3:]
events = [json.loads(l) for l in lines[:-1]]
text = "".join(e["choices"][0]["text"] for e in events)
assert text == open(sys.argv[2], encoding="utf-8").read(), text
assert events[-1]["choices"][0]["finish_reason"] == "length"
assert len(events) == 24 + 1, len(events)  # one per token, then the finish
assert all("token_id" in e["choices"][0] for e in events[:-1])
print(f"+ stream: {len(events)} events, same text")
PY

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
pids=()
for i in $(seq 1 64); do
  curl -s -m 60 -o "$S/conc_$i.json" -X POST --data-binary "$GREEDY" "$URL/v1/completions" &
  pids+=($!)
done
wait "${pids[@]}"
python3 - "$S" "$S/reference.txt" <<'PY' || fail "concurrent clients"
import json, sys
want = open(sys.argv[2], encoding="utf-8").read()
for i in range(1, 65):
    r = json.load(open(f"{sys.argv[1]}/conc_{i}.json"))
    assert r["choices"][0]["text"] == want, (i, r)
print("+ 64 concurrent clients: all equal the reference")
PY
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

# SIGTERM to the server (rank 0, a child of mpirun): every rank exits 0.
RANK0=""
for c in $(pgrep -P "$SERVER_PID"); do
  tr '\0' '\n' <"/proc/$c/environ" | grep -qx 'OMPI_COMM_WORLD_RANK=0' && RANK0=$c
done
[ -n "$RANK0" ] || fail "cannot find rank 0 of mpirun $SERVER_PID"
kill -TERM "$RANK0"
for _ in $(seq 1 120); do
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.25
done
kill -0 "$SERVER_PID" 2>/dev/null && fail "moe-serve still running 30 s after SIGTERM"
wait "$SERVER_PID"
rc=$?
SERVER_PID=""
[ $rc = 0 ] || fail "moe-serve exited $rc after SIGTERM: $(tail -n 5 "$S/serve.log")"
grep -q "moe-serve: stopped" "$S/serve.log" || fail "no clean stop in the log: $(tail -n 5 "$S/serve.log")"
echo "PASS"
