#!/usr/bin/env bash
# umoe.sh — UMoE end to end (tiny.yaml, 8 steps): model.attention = umoe with the FFN sharing
# its experts (model.moe.share_attention_ffn) trains on np 1, 2 and 4 with the same losses
# (1e-4, aux_loss_scope rank as tiny.yaml); resuming a step-4 checkpoint is bit-exact on np 2
# and matches on np 1 (1e-4). UMoE attention without sharing (two banks per block, the
# attention's keyed apart in the checkpoint) resumes on np 1 too. moe-generate decodes both
# through the KV cache with the same greedy text on np 1 and 2.
source "$(dirname "$0")/lib.sh"
short=(--set train.steps=8 --set checkpoint.every=4 --set train.eval_every=4)
umoe=(--set model.attention=umoe --set model.umoe.d_qk=16 --set model.umoe.query_rank=4)
share=(--set model.moe.share_attention_ffn=true)
train 2 shared "${short[@]}" "${umoe[@]}" "${share[@]}"
/usr/bin/python3 - "$S/shared.jsonl" <<'PY' || fail "metrics"
import json, math, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in steps if not r.get("summary")]
assert len(steps) >= 2 and all(math.isfinite(r["loss"]) for r in steps), steps
assert steps[-1]["loss"] < steps[0]["loss"], (steps[0]["loss"], steps[-1]["loss"])
print("shared: loss", steps[0]["loss"], "->", steps[-1]["loss"])
PY
# The checkpoint holds the shared experts once, under the MoE layer's key, and the attention's
# replicated weights.
/usr/bin/python3 - "$S/shared/ck/step-00000004/model.h5" <<'PY' || fail "checkpoint layout"
import sys, h5py
f = h5py.File(sys.argv[1], "r")
layers = sorted(f["/model/experts"].keys())
assert layers == ["layer0", "layer1"], layers
for name in ("w_q", "w_k", "w_a", "w_b", "router.w", "shared.0.w1"):
    assert f"/model/dense/blocks.0.attn.{name}" in f, name
PY
train 4 shared_np4 "${short[@]}" "${umoe[@]}" "${share[@]}"
compare --keys loss,val_loss --steps 1:8 --tol 1e-4 "$S/shared.jsonl" "$S/shared_np4.jsonl"
train 1 shared_np1 "${short[@]}" "${umoe[@]}" "${share[@]}" --set checkpoint.every=0
compare --keys loss,val_loss --steps 1:8 --tol 1e-4 "$S/shared.jsonl" "$S/shared_np1.jsonl"

train 2 part "${short[@]}" "${umoe[@]}" "${share[@]}" --stop-after 4
train 2 rest "${short[@]}" "${umoe[@]}" "${share[@]}" --resume "$S/part/ck"
compare --keys loss,grad_norm,val_loss --steps 5:8 --tol 0 "$S/shared.jsonl" "$S/rest.jsonl"
train 1 rest_np1 "${short[@]}" "${umoe[@]}" "${share[@]}" --resume "$S/part/ck"
compare --keys loss,val_loss --steps 5:8 --tol 1e-4 "$S/shared.jsonl" "$S/rest_np1.jsonl"

# Attention-only UMoE: its own bank (checkpoint layers 2 and 3 of 2 blocks) besides the FFN's.
train 2 att "${short[@]}" "${umoe[@]}"
train 2 att_part "${short[@]}" "${umoe[@]}" --stop-after 4
train 1 att_rest "${short[@]}" "${umoe[@]}" --resume "$S/att_part/ck"
compare --keys loss,val_loss --steps 5:8 --tol 1e-4 "$S/att.jsonl" "$S/att_rest.jsonl"

# Generation through the KV cache (rotated keys and hidden states): greedy text on np 1 equals
# np 2, for both kinds of bank.
gen=$(dirname "$MOE_TRAIN")/moe-generate
for ck in shared att; do
  for np in 1 2; do
    timeout 60 "${MPIRUN[@]}" -np $np "$gen" --checkpoint "$S/$ck/ck" --prompt "In the" \
      --max-tokens 12 --temperature 0 >"$S/gen_${ck}_np$np.txt" 2>"$S/gen_${ck}_np$np.log" \
      || { cat "$S/gen_${ck}_np$np.log"; fail "moe-generate np $np on the $ck checkpoint"; }
  done
  [ -s "$S/gen_${ck}_np1.txt" ] || fail "no text from the $ck checkpoint"
  # (line 1 is a header naming the rank count)
  cmp <(tail -n +2 "$S/gen_${ck}_np1.txt") <(tail -n +2 "$S/gen_${ck}_np2.txt") \
    || fail "np 1 and np 2 generate different text ($ck)"
  echo "$ck: $(tail -n +2 "$S/gen_${ck}_np1.txt" | od -c | head -n 2)"
done
echo "umoe: ok"
