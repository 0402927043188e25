#!/usr/bin/env bash
# serve_np4.sh — moe-serve under mpirun -np 4 (one expert per rank of the tiny model), queried
# with curl on 127.0.0.1: greedy moe-generate gives the same text on 1, 2 and 4 ranks, and the
# server's greedy completion (plain and streamed) and 16 concurrent ones equal it; a bad request
# gets a 400 while the others are served; /metrics counts the per-expert load; SIGTERM to rank 0
# ends all four ranks with exit 0.
# Environment as for tests/train (lib.sh), plus MOE_SERVE and MOE_GENERATE (the binaries).
source "$MOE_TESTS/lib.sh"
: "${MOE_SERVE:?}" "${MOE_GENERATE:?}"

CK=$S/tiny/ck
PROMPT="In the beginning"
N=24
source "$(dirname "$0")/serve_lib.sh"
train 2 tiny --set train.steps=100 --set checkpoint.every=100

for np in 1 2 4; do generated greedy_np$np $np --max-tokens $N --temperature 0; done
cmp -s "$S/greedy_np1.txt" "$S/greedy_np2.txt" || fail "moe-generate greedy differs on 1 and 2 ranks"
cmp -s "$S/greedy_np1.txt" "$S/greedy_np4.txt" || fail "moe-generate greedy differs on 1 and 4 ranks"
cp "$S/greedy_np4.txt" "$S/reference.txt"
echo "+ moe-generate greedy: the same text on 1, 2 and 4 ranks"

start_server 4 --max-batch 8
GREEDY="{\"prompt\": \"$PROMPT\", \"max_tokens\": $N, \"temperature\": 0}"
check_greedy

bad_during_load() {  # a bad request while the clients are in flight gets its 400
  local out
  out=$(post '{"prompt": "a", "max_tokens": "ten"}')
  [ "${out%% *}" = 400 ] || fail "bad request during the load: $out"
  echo "+ a bad request during the load: 400"
}
concurrent_greedy 16 bad_during_load

curl -sf -m 5 "$URL/metrics" >"$S/metrics.json" || fail "/metrics"
python3 - "$S/metrics.json" <<'PY' || fail "/metrics content: $(cat "$S/metrics.json")"
import json, sys
m = json.load(open(sys.argv[1]))
load = m["expert_load"]
assert m["expert_load_blocks"] == [0, 1] and [len(r) for r in load] == [4, 4], m
assert sum(load[0]) == sum(load[1]) > 0, load
print("+ expert load:", load)
PY

stop_server
echo "PASS"
