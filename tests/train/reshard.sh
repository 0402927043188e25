#!/usr/bin/env bash
# reshard.sh FROM TO... — the step-10 checkpoint of an uninterrupted 20-step run on FROM ranks
# resumes on each TO rank count, and steps 11..20 match the uninterrupted run within 1e-4
# absolute (loss and val_loss). Runs with model.moe.aux_loss_coef=0: with the load-balancing
# loss on, different rank counts split the batch into different micro-steps and differ by up to
# ~1.5e-3 even without a checkpoint (see equivalence.sh); that is not what this test checks.
source "$(dirname "$0")/lib.sh"
from=${1:?FROM}
shift
noaux=(--set model.moe.aux_loss_coef=0)
train "$from" full "${noaux[@]}"
ckpt=$S/full/ck/step-00000010
[ -f "$ckpt/model.h5" ] || fail "no checkpoint $ckpt"
for to in "$@"; do
  train "$to" to$to "${noaux[@]}" --resume "$ckpt"
  grep -q "resumed from .* at step 10 (written by $from rank(s), now $to)" "$S/to$to.log" ||
    fail "np $to: no 'resumed ... written by $from rank(s), now $to' line"
  compare --keys loss,val_loss --steps 11:20 --tol 1e-4 "$S/full.jsonl" "$S/to$to.jsonl"
done
