# serve_lib.sh — shared pieces of the moe-serve program tests (sourced after lib.sh): the
# server's lifetime (started on a free 127.0.0.1 port, killed on any exit), moe-generate
# reference texts, and small HTTP helpers. Expects S, MPIRUN, CK, PROMPT, MOE_SERVE and
# MOE_GENERATE.

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

start_server() {  # NP ARGS...: moe-serve on NP ranks; sets PORT, URL, SERVER_PID
  local np=$1
  shift
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  URL=http://127.0.0.1:$PORT
  "${MPIRUN[@]}" -np "$np" "$MOE_SERVE" --checkpoint "$CK" --host 127.0.0.1 --port "$PORT" \
    "$@" >"$S/serve.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 120); do
    curl -sf "$URL/healthz" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || fail "moe-serve exited early: $(tail -n 5 "$S/serve.log")"
    sleep 0.25
  done
  curl -sf "$URL/healthz" | grep -q '"ok"' || fail "/healthz not ok: $(tail -n 5 "$S/serve.log")"
  echo "+ moe-serve np $np on $URL"
}

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

# SIGTERM to the server (rank 0, a child of mpirun): every rank exits 0 within 30 s.
stop_server() {
  local rank0="" c rc
  for c in $(pgrep -P "$SERVER_PID"); do
    tr '\0' '\n' <"/proc/$c/environ" | grep -qx 'OMPI_COMM_WORLD_RANK=0' && rank0=$c
  done
  [ -n "$rank0" ] || fail "cannot find rank 0 of mpirun $SERVER_PID"
  kill -TERM "$rank0"
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
  echo "+ SIGTERM: every rank stopped cleanly"
}

# The greedy completion of $GREEDY equals $S/reference.txt (24 tokens, finish "length"), and so
# does the same completion streamed: one event per token, a finish event, then [DONE].
check_greedy() {
  local out
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
}

# concurrent_greedy N [COMMAND...]: N greedy clients ($GREEDY) at once; COMMAND (if any) runs while
# they are in flight; each client must get the reference text.
concurrent_greedy() {
  local n=$1 i
  shift
  local pids=()
  for i in $(seq 1 "$n"); do
    curl -s -m 60 -o "$S/conc_$i.json" -X POST --data-binary "$GREEDY" "$URL/v1/completions" &
    pids+=($!)
  done
  [ $# -gt 0 ] && "$@"
  wait "${pids[@]}"
  python3 - "$S" "$S/reference.txt" "$n" <<'PY' || fail "$n concurrent clients"
import json, sys
want = open(sys.argv[2], encoding="utf-8").read()
for i in range(1, int(sys.argv[3]) + 1):
    r = json.load(open(f"{sys.argv[1]}/conc_{i}.json"))
    assert r["choices"][0]["text"] == want, (i, r)
print(f"+ {sys.argv[3]} concurrent clients: all equal the reference")
PY
}
