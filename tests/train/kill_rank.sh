#!/usr/bin/env bash
# kill_rank.sh — a rank killed (SIGKILL) in the middle of training ends the job, and the last
# checkpoint stays intact: tiny.yaml with train.steps=100000 and checkpoint.every=5 on 2 ranks;
# a moment after `latest` names step 10 or later, one rank is killed. mpirun must exit non-zero within
# 20 s; `latest` must name a complete step directory, and --resume from the checkpoint root on
# 1 rank (--stop-after 2, same checkpoint.dir, so the save also meets any half-written leftover)
# must succeed with finite losses at the two next steps.
source "$(dirname "$0")/lib.sh"
ck=$S/job/ck
mkdir -p "$S/job"
"${MPIRUN[@]}" -np 2 "$MOE_TRAIN" --config "$MOE_TINY" --set "data.path=$MOE_DATA" \
  --set "run.dir=$S/job/run" --set "checkpoint.dir=$ck" --set train.steps=100000 \
  --set checkpoint.every=5 --set log.every=100 --metrics "$S/job.jsonl" >"$S/job.log" 2>&1 &
mpirun_pid=$!
cleanup() { kill -9 "$mpirun_pid" $(pgrep -f -- "checkpoint.dir=$ck") 2>/dev/null; }
trap cleanup EXIT

# Wait (at most 60 s) until a checkpoint at step >= 10 exists.
for _ in $(seq 600); do
  step=$(sed -n 's/^step-0*//p' "$ck/latest" 2>/dev/null)
  [ -n "$step" ] && [ "$step" -ge 10 ] && break
  kill -0 "$mpirun_pid" 2>/dev/null || { tail "$S/job.log"; fail "the job ended early"; }
  sleep 0.1
done
[ -n "$step" ] && [ "$step" -ge 10 ] || fail "no checkpoint at step >= 10 after 60 s"
sleep 0.25  # into the following steps (a step takes ~30 ms), not right after the save

# The ranks are the moe-train processes with this test's checkpoint.dir, other than mpirun.
ranks=$(pgrep -f -- "moe-train .*checkpoint.dir=$ck" | grep -vx "$mpirun_pid")
[ "$(echo "$ranks" | wc -w)" -eq 2 ] || fail "expected 2 rank processes, found: $ranks"
victim=$(echo "$ranks" | tail -n 1)
echo "latest names step $step; kill -9 rank process $victim (of $(echo $ranks))"
kill -9 "$victim"
t0=$(date +%s.%N)
for _ in $(seq 200); do
  kill -0 "$mpirun_pid" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$mpirun_pid" 2>/dev/null && fail "mpirun still running 20 s after the kill"
wait "$mpirun_pid"
rc=$?
trap - EXIT
printf 'mpirun exited with %d after %.1f s\n' "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)"
tail -n 5 "$S/job.log"
[ "$rc" -ne 0 ] || fail "mpirun exited 0 after a rank was killed"
left=$(pgrep -f -- "checkpoint.dir=$ck")
[ -z "$left" ] || fail "processes left behind: $left"

latest=$(cat "$ck/latest")
echo "after the kill: latest = $latest; $(ls -A "$ck" | tr '\n' ' ')"
[ -f "$ck/$latest/model.h5" ] || fail "latest names $latest, which has no model.h5"
n=${latest#step-}
n=$((10#$n))
train 1 resume --set "checkpoint.dir=$ck" --set train.steps=100000 --resume "$ck" --stop-after 2
/usr/bin/python3 - "$S/resume.jsonl" "$n" <<'PY' || fail "the resumed run's metrics are wrong"
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
n = int(sys.argv[2])
steps = [(r["step"], r["loss"]) for r in recs if not r.get("summary")]
print("resumed at", n, "->", steps)
assert [s for s, _ in steps] == [n + 1, n + 2] and all(math.isfinite(l) for _, l in steps)
PY
[ "$(cat "$ck/latest")" = "$(printf 'step-%08d' $((n + 2)))" ] || fail "latest after resume: $(cat "$ck/latest")"
echo OK
