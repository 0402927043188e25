#!/usr/bin/env bash
# nonfinite_skip.sh CHECKPOINT — with train.on_nonfinite=skip, a run whose loss is NaN at every
# step (CHECKPOINT holds a NaN weight; see checkpoints.sh) finishes with exit 0, and reports the
# skipped steps: "skipped": true in each step's metrics record, "skipped_steps": 3 in the
# summary and a warning naming each step on stderr.
source "$(dirname "$0")/lib.sh"
ckpt=${1:?CHECKPOINT}
train 2 skip --set train.on_nonfinite=skip --resume "$ckpt" --stop-after 3
/usr/bin/python3 - "$S/skip.jsonl" <<'PY' || fail "metrics do not report the skipped steps"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in recs if not r.get("summary")]
summary = recs[-1]
print([(r["step"], r["loss"], r.get("skipped")) for r in steps], summary.get("skipped_steps"))
assert [r["step"] for r in steps] == [11, 12, 13]
assert all(r.get("skipped") is True for r in steps)
assert summary.get("summary") and summary.get("skipped_steps") == 3
PY
for s in 11 12 13; do
  grep -Eq "step $s: loss is -?nan: update skipped" "$S/skip.log" ||
    fail "no warning naming step $s in $S/skip.log"
done
echo OK
