#!/usr/bin/env bash
# serve_umoe.sh — moe-serve on a UMoE checkpoint (model.attention = umoe, the FFN sharing the
# attention's experts): the server's greedy completion (plain and streamed) and 8 concurrent
# ones equal moe-generate's text, which is the same on 1 and 2 ranks; the server runs on 2 and
# on 4 ranks; SIGTERM ends every rank with exit 0.
# Environment as for tests/train (lib.sh), plus MOE_SERVE and MOE_GENERATE (the binaries).
source "$MOE_TESTS/lib.sh"
: "${MOE_SERVE:?}" "${MOE_GENERATE:?}"

CK=$S/umoe/ck
PROMPT="In the beginning"
N=24
source "$(dirname "$0")/serve_lib.sh"
train 2 umoe --set train.steps=200 --set checkpoint.every=200 --set train.eval_every=0 \
  --set model.attention=umoe --set model.umoe.d_qk=16 --set model.umoe.query_rank=4 \
  --set model.moe.share_attention_ffn=true

generated greedy_np1 1 --max-tokens $N --temperature 0
generated greedy_np2 2 --max-tokens $N --temperature 0
cmp -s "$S/greedy_np1.txt" "$S/greedy_np2.txt" || fail "moe-generate greedy differs on 1 and 2 ranks"
cp "$S/greedy_np2.txt" "$S/reference.txt"
# A trained model, not a degenerate one: the greedy text holds letters.
grep -q '[a-z]' "$S/reference.txt" || fail "greedy text has no letters: '$(cat "$S/reference.txt")'"
echo "+ moe-generate greedy on the UMoE checkpoint: $(cat "$S/reference.txt" | head -c 60)"

GREEDY="{\"prompt\": \"$PROMPT\", \"max_tokens\": $N, \"temperature\": 0}"
for np in 2 4; do
  start_server $np --max-batch 4
  check_greedy
  concurrent_greedy 8
  stop_server
done
echo "PASS"
