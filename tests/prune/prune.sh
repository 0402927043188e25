#!/usr/bin/env bash
# prune.sh — moe-prune end to end on real files and real mpirun: tiny.yaml (4 experts per MoE
# layer) trained 10 steps on 2 ranks; pruned 4 -> 2 on 2 ranks with each method (merge also
# with --eval: it prints the pruned model's task loss); the merged checkpoint then generates
# text with moe-generate on 1 rank (fewer ranks than it was written from) and resumes training
# on 1 rank (its optimiser state loads); then --layers 1 (block 1 only, per-layer expert counts)
# generates and resumes on 1 rank too. Leaves $S/base/ck for bad_input.sh.
# Environment: lib.sh's, plus MOE_PRUNE and MOE_GENERATE (the binaries).
source "$(dirname "$0")/../train/lib.sh"
: "${MOE_PRUNE:?}" "${MOE_GENERATE:?}"

train 2 base --set train.steps=10 --set checkpoint.every=10
[ -f "$S/base/ck/step-00000010/model.h5" ] || fail "no base checkpoint"

prune() {  # prune NAME ARGS...: moe-prune on 2 ranks into $S/NAME, log $S/NAME.log
  local name=$1
  shift
  echo "+ np 2: moe-prune $* (log $S/$name.log)"
  if ! timeout --kill-after=5 90 "${MPIRUN[@]}" -np 2 "$MOE_PRUNE" --checkpoint "$S/base/ck" \
      --task-data "$MOE_DATA" --target-experts 2 --tokens 1024 --output "$S/$name" "$@" \
      >"$S/$name.log" 2>&1; then
    tail -n 20 "$S/$name.log"
    fail "moe-prune ($name) exited non-zero"
  fi
  cat "$S/$name.log"
}
prune merged --method merge --eval
grep -q "task loss after: [0-9]" "$S/merged.log" || fail "no task loss after pruning"
grep -Eq "^  after +2 +2 +4 " "$S/merged.log" || fail "no All2All row for 2 experts on 2 ranks"
grep -Eq "^  after +2 +1 +0 +[0-9]+ +0$" "$S/merged.log" || fail "no All2All row for 1 rank"
prune noalign --method merge-noalign
prune freq --method frequency

ck=$S/merged/step-00000010
[ -f "$ck/model.h5" ] || fail "no pruned checkpoint $ck"
/usr/bin/python3 - "$ck/model.h5" <<'PY' || fail "pruned checkpoint layout"
import h5py, sys
f = h5py.File(sys.argv[1], "r")
assert f.attrs["n_experts"] == 4, f.attrs["n_experts"]          # 2 layers x 2 experts
assert "num_experts: 2" in f.attrs["config"]
assert f["/model/dense/blocks.0.moe.router.w"].shape == (64, 2)
assert sorted(f["/model/experts/layer1"].keys()) == ["expert0", "expert1"]
assert "/optim/m/experts/layer0/expert0/w1" in f
print("pruned layout ok")
PY

echo "+ np 1: moe-generate from the pruned checkpoint"
timeout --kill-after=5 60 "${MPIRUN[@]}" -np 1 "$MOE_GENERATE" --checkpoint "$S/merged" \
  --data "$MOE_DATA" --prompt "In the beginning" --max-tokens 16 --temperature 0 \
  >"$S/generate.log" 2>&1 || { cat "$S/generate.log"; fail "moe-generate on the pruned model"; }
cat "$S/generate.log"
grep -q "checkpoint step 10, 1 rank(s)" "$S/generate.log" || fail "moe-generate output"

train 1 resumed --set model.moe.num_experts=2 --set train.steps=12 --resume "$S/merged"
grep -q "resumed from .* at step 10 (written by 2 rank(s), now 1)" "$S/resumed.log" ||
  fail "no 'resumed ... at step 10' line"
# --layers: block 1 only (4 -> 2); block 0 keeps 4 experts (model.moe.layer_experts "4,2").
# Generates on 1 rank and resumes training on 1 rank with the per-layer counts.
prune layer1 --method merge --layers 1
grep -q "merge, 4 -> 4,2 experts" "$S/layer1.log" || fail "no '4 -> 4,2 experts' line"
/usr/bin/python3 - "$S/layer1/step-00000010/model.h5" <<'PY' || fail "one-layer-pruned layout"
import h5py, sys
f = h5py.File(sys.argv[1], "r")
assert f.attrs["n_experts"] == 6, f.attrs["n_experts"]          # 4 + 2
assert "layer_experts: 4,2" in f.attrs["config"], f.attrs["config"]
assert f["/model/dense/blocks.0.moe.router.w"].shape == (64, 4)
assert f["/model/dense/blocks.1.moe.router.w"].shape == (64, 2)
print("one-layer-pruned layout ok")
PY
timeout --kill-after=5 60 "${MPIRUN[@]}" -np 1 "$MOE_GENERATE" --checkpoint "$S/layer1" \
  --data "$MOE_DATA" --prompt "In the beginning" --max-tokens 16 --temperature 0 \
  >"$S/generate1.log" 2>&1 || { cat "$S/generate1.log"; fail "moe-generate, one layer pruned"; }
grep -q "checkpoint step 10, 1 rank(s)" "$S/generate1.log" || fail "moe-generate output (layer1)"
train 1 resumed1 --set model.moe.layer_experts=4,2 --set train.steps=12 --resume "$S/layer1"
grep -q "resumed from .* at step 10 (written by 2 rank(s), now 1)" "$S/resumed1.log" ||
  fail "no 'resumed ... at step 10' line (layer1)"
echo "PASS"
