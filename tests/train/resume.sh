#!/usr/bin/env bash
# resume.sh — resume is exact on the same rank count (np 2): 20 uninterrupted steps against
# `--stop-after 10` then `--resume` for steps 11..20. Tolerance 0: loss, grad_norm, lr and
# val_loss must be bit-equal at every step 11..20 (and at 1..10 in the first launch).
source "$(dirname "$0")/lib.sh"
train 2 full
train 2 part --stop-after 10
[ "$(cat "$S/part/ck/latest")" = step-00000010 ] || fail "--stop-after 10 left latest = $(cat "$S/part/ck/latest")"
grep -q '"last_step":10' "$S/part.jsonl" || fail "the first launch did not end at step 10"
train 2 rest --resume "$S/part/ck"
grep -q '"first_step":10' "$S/rest.jsonl" || fail "the resumed launch did not start at step 10"
compare --keys loss,grad_norm,lr,val_loss --steps 1:10 --tol 0 "$S/full.jsonl" "$S/part.jsonl"
compare --keys loss,grad_norm,lr,val_loss --steps 11:20 --tol 0 "$S/full.jsonl" "$S/rest.jsonl"
