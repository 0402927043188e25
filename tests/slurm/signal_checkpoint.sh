#!/usr/bin/env bash
# signal_checkpoint.sh <SIGNAL> [MOE-TRAIN ARGS...] — without Slurm: SIGUSR1 or SIGTERM to mpirun (which passes it to
# every rank) during a 2-rank tiny run: all ranks stop after the same step N with a checkpoint,
# rank 0 prints "stopping at step N on signal SIG<name>: checkpoint <dir>", mpirun exits 0, and
# --resume starts at step N. Extra arguments go to every moe-train (e.g. another router).
# Environment (from tests/CMakeLists.txt): MOE_TRAIN, MOE_TINY, MOE_DATA, MOE_MPIRUN, MOE_SCRATCH.
set -euo pipefail
sig=$1
shift
S=$MOE_SCRATCH
rm -rf "$S"
mkdir -p "$S"
fail() {
  echo "FAIL: $*" >&2
  tail -n 20 "$S/run.log" >&2 || true
  exit 1
}
common=(--config "$MOE_TINY" --set "data.path=$MOE_DATA" --set "run.dir=$S/run"
  --set "checkpoint.dir=$S/ck" --set log.every=1 "$@")
# shellcheck disable=SC2086  # MOE_MPIRUN is a command line
$MOE_MPIRUN -np 2 "$MOE_TRAIN" "${common[@]}" --set train.steps=100000 >"$S/run.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  grep -q '^step [0-9]*/100000' "$S/run.log" && break
  kill -0 "$pid" 2>/dev/null || fail "the run ended before its first step"
  sleep 0.1
done
kill -s "$sig" "$pid"
rc=0
for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "still running 30 s after SIG$sig"
wait "$pid" || rc=$?
[ "$rc" -eq 0 ] || fail "exit code $rc after SIG$sig, expected 0"
line=$(grep -m1 "^stopping at step [0-9]* on signal SIG$sig: checkpoint $S/ck/step-" "$S/run.log") ||
  fail "no 'stopping at step N on signal SIG$sig: checkpoint' line"
n=${line#stopping at step }
n=${n%% *}
[ "$(cat "$S/ck/latest")" = "$(printf 'step-%08d' "$n")" ] || fail "latest is not step $n"
[ "$(grep -c '^stopping at step' "$S/run.log")" -eq 1 ] || fail "more than one rank reported"
echo "$line"
# shellcheck disable=SC2086
$MOE_MPIRUN -np 2 "$MOE_TRAIN" "${common[@]}" --set train.steps=100000 --resume "$S/ck" \
  --stop-after 1 >"$S/resume.log" 2>&1 || fail "the resume failed: $(tail -n 3 "$S/resume.log")"
grep -q "resumed from $S/ck at step $n " "$S/resume.log" || fail "the resume did not start at step $n"
echo "resumed at step $n"
