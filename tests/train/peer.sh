#!/usr/bin/env bash
# peer.sh — moe-train with a PEER layer (model.moe.kind: peer) on tiny.yaml: trains on 2 ranks
# with the loss falling and peer_usage / peer_kl in the metrics; resume on 2 ranks is bit-equal
# (sparse AdamW state and batch-norm running statistics come back from the checkpoint); the
# step-10 checkpoint of 2 ranks resumes on 1 rank (U and V resharded by block id) within 1e-4.
# The 1-rank run uses micro_batch 4 so that every micro-step sees the same global batch as on
# 2 ranks (batch-norm statistics are those of a micro-step's global batch).
source "$(dirname "$0")/lib.sh"
peer=(--set model.moe.kind=peer --set model.peer.n_sub_keys=16 --set model.peer.heads=2
  --set model.peer.top_k=4 --set model.peer.d_key=16 --set model.peer.usage_window=5)
train 2 full "${peer[@]}"
/usr/bin/python3 - "$S/full.jsonl" <<'PY' || fail "metrics"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"step"' in l and '"loss"' in l]
assert len(recs) == 20, len(recs)
for r in recs:
    assert 0 < r["peer_usage"] <= 1 and r["peer_kl"] >= 0, r
    assert r["peer_bytes_per_token"] > 0 and r["peer_pairs_per_token"] >= 1, r
assert recs[-1]["loss"] < recs[0]["loss"] - 0.5, (recs[0]["loss"], recs[-1]["loss"])
print("peer metrics ok: loss %.3f -> %.3f, usage %.3f, kl %.3f" %
      (recs[0]["loss"], recs[-1]["loss"], recs[-1]["peer_usage"], recs[-1]["peer_kl"]))
PY
train 2 part "${peer[@]}" --stop-after 10
train 2 rest "${peer[@]}" --resume "$S/part/ck"
compare --keys loss,grad_norm,lr,val_loss --steps 11:20 --tol 0 "$S/full.jsonl" "$S/rest.jsonl"
train 1 to1 "${peer[@]}" --set train.micro_batch=4 --resume "$S/full/ck/step-00000010"
compare --keys loss,val_loss --steps 11:20 --tol 1e-4 "$S/full.jsonl" "$S/to1.jsonl"
