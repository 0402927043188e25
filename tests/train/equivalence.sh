#!/usr/bin/env bash
# equivalence.sh MODE — the first 20 steps of tiny.yaml on 1, 2 and 4 ranks give the same
# loss (and val_loss at steps 10 and 20) within 1e-4 absolute (the losses are 3.4 to 5.6, so
# that is also about 2e-5 relative). MODE:
#   as-is           tiny.yaml unchanged: 4, 2 and 1 micro-steps of accumulation per step, with
#                   model.moe.aux_loss_scope: rank (each rank's micro-batch balanced alone).
#   no-aux          model.moe.aux_loss_coef=0: the same, without the load-balancing loss.
#   one-micro-step  aux_loss_scope=global and train.micro_batch = 8 / ranks, so every rank count
#                   runs one micro-step of the whole global batch and the global load-balancing
#                   loss covers the same tokens.
#   hierarchical    as-is, with the node-aware exchange on forced node layouts: 1 rank, then
#                   comm.exchange=hierarchical on 2 nodes x 1 rank and on 2 nodes x 2 ranks
#                   (comm.ranks_per_node 1 and 2).
# The load-balancing loss E sum_i f_i P_i is not linear in the tokens, so its gradient depends on
# which tokens share the statistics: with the global scope (all ranks' tokens of a micro-step)
# that grouping changes with the rank count under accumulation; with the rank scope the groups
# are the micro-batches of `micro_batch` windows, the same on any rank count.
source "$(dirname "$0")/lib.sh"
mode=${1:?MODE}
for np in 1 2 4; do
  case $mode in
    as-is) train $np np$np ;;
    no-aux) train $np np$np --set model.moe.aux_loss_coef=0 ;;
    hierarchical)
      if [ $np -eq 1 ]; then train 1 np1; else
        train $np np$np --set comm.exchange=hierarchical --set comm.ranks_per_node=$((np / 2))
      fi ;;
    one-micro-step)
      train $np np$np --set model.moe.aux_loss_scope=global --set train.micro_batch=$((8 / np)) ;;
    *) fail "unknown mode $mode" ;;
  esac
done
compare --keys loss,val_loss --steps 1:20 --tol 1e-4 "$S/np1.jsonl" "$S/np2.jsonl" "$S/np4.jsonl"
