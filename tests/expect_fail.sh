#!/usr/bin/env bash
# expect_fail.sh SECONDS REGEX -- COMMAND...
# Passes when COMMAND exits non-zero within SECONDS (no hang) and its combined output matches
# the extended REGEX. Used by the program tests for bad input and failing ranks.
set -u
limit=$1 regex=$2
shift 2
[ "$1" = "--" ] && shift
start=$(date +%s)
out=$(timeout --kill-after=5 "$limit" "$@" 2>&1)
rc=$?
elapsed=$(( $(date +%s) - start ))
printf '%s\n' "$out" | tail -n 30
if [ $rc -eq 0 ]; then echo "expect_fail: exited 0, expected a failure"; exit 1; fi
if [ "$elapsed" -ge "$limit" ]; then echo "expect_fail: still running after ${limit}s (hang)"; exit 1; fi
if ! printf '%s\n' "$out" | grep -Eq -- "$regex"; then
  echo "expect_fail: exit $rc, but output does not match /$regex/"
  exit 1
fi
echo "expect_fail: exit $rc after ${elapsed}s with the expected message"
