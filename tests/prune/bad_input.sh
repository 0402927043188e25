#!/usr/bin/env bash
# bad_input.sh CKPT — moe-prune on 2 ranks refuses, with a non-zero exit within 30 s and a
# message naming the problem on every rank that reports: a target larger than the expert count,
# task data with another vocabulary (a BPE file), and a dense checkpoint (every_n_layers 0).
# CKPT: the 4-expert tiny checkpoint prune.sh leaves. Environment: lib.sh's, plus MOE_PRUNE and
# MOE_DATA_TOOL (moe-data).
source "$(dirname "$0")/../train/lib.sh"
: "${MOE_PRUNE:?}" "${MOE_DATA_TOOL:?}"
ck=${1:?CKPT}

expect_fail() {  # expect_fail NAME REGEX ARGS...
  local name=$1 re=$2
  shift 2
  echo "+ np 2: moe-prune $* (expect: $re)"
  local rc=0
  timeout --kill-after=5 30 "${MPIRUN[@]}" -np 2 "$MOE_PRUNE" --output "$S/$name.out" "$@" \
    >"$S/$name.log" 2>&1 || rc=$?
  cat "$S/$name.log"
  [ "$rc" -ne 0 ] || fail "$name: exit 0"
  [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || fail "$name: timed out"
  grep -Eq "$re" "$S/$name.log" || fail "$name: no line matching '$re'"
  [ ! -e "$S/$name.out/latest" ] || fail "$name: wrote a checkpoint"
}

expect_fail too_many "rank [01]: error: config: (rank [01]: )?--target-experts 5 is larger than the 4 experts" \
  --checkpoint "$ck" --task-data "$MOE_DATA" --target-experts 5

"$MOE_DATA_TOOL" build --input "$MOE_TESTS/../data/genesis.txt" --output "$S/bpe.h5" \
  --tokenizer bpe --vocab-size 512 >"$S/bpe.log" 2>&1 || { cat "$S/bpe.log"; fail "bpe file"; }
expect_fail vocab "rank [01]: error: data: (rank [01]: )?task data .*bpe.h5 has a vocabulary of 512 \(bpe" \
  --checkpoint "$ck" --task-data "$S/bpe.h5" --target-experts 2

train 2 dense --set model.moe.every_n_layers=0 --set train.steps=2 --set checkpoint.every=2
expect_fail dense "rank [01]: error: config: (rank [01]: )?checkpoint .* is a dense model" \
  --checkpoint "$S/dense/ck" --task-data "$MOE_DATA" --target-experts 2
expect_fail layers "rank [01]: error: config: (rank [01]: )?--layers 2: block 2 is not an MoE block" \
  --checkpoint "$ck" --task-data "$MOE_DATA" --target-experts 2 --layers 2

echo "PASS"
