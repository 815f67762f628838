#!/usr/bin/env bash
# GPU job, training call (round 7, #10): relabelled copies of classification tasks (training.relabel), so adapters
# take the answer words from the instruction instead of imposing those of the tasks they resemble. A copy keeps a
# task's inputs and meaning, answers with other words, and its definition says which. Three runs of the shipped
# recipe (residual on the held-out multi-task LoRA, M, lr 2e-4, 32 tasks x 2, 600 steps), decided before any answer:
#   t2l-r7-rl1       one relabelled copy of each of the 88 qualifying tasks
#   t2l-r7-rl2       two copies each
#   t2l-r7-rl2-ex50  two copies, and one or two in-context examples in half the samples (not a third)
# Each keeps its step with the lowest held-out train-task loss (held-out tasks and their copies are never trained
# on); a variant replaces the shipped one (1.945) only if its held-out loss is lower. Never dev.
# Staged first: ../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb-relabel.safetensors
#   --file runs/round5-bases.tgz (emb-relabel: `python -m training.relabel --embeddings runs/emb.safetensors
#   --out runs/emb-relabel.safetensors`, the copies' description embeddings added; the GPU machine has no encoder)
# -> $OUT: variants.json, logs, the three checkpoints (split tar); then h200-variants-predict.sh
set -u
EMB=/tmp/stage/emb-relabel.safetensors
. training/jobs/common.sh
[ -d $W/multitask-holdout ] || tar -C $W -xzf /tmp/stage/round5-bases.tgz
S="--stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600 --hypernet-lr 2e-4
   --base-adapter $W/multitask-holdout"
for v in "t2l-r7-rl1 --relabel-copies 1" "t2l-r7-rl2 --relabel-copies 2" \
         "t2l-r7-rl2-ex50 --relabel-copies 2 --example-rate 0.5"; do set -- $v; N=$1; shift
  ( timeout ${SFT_S:-520} $P $C $S --sft-out $N "$@" > $W/logs/$N.log 2>&1; echo "$N rc=$? $(date +%T)" ) &
done
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $W
python3 -m training.variants $W > $W/variants.json
tar -cf - t2l-r7-* | split -b 15M -d - $OUT/ckpt.tar.
cp variants.json $OUT/; tar -czf $OUT/logs-round7.tgz logs variants.json
for f in logs/t2l-r7-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "relabelled|validation loss|strength|Error|error" | tail -4 | cut -c1-200; done
python3 -c "
import json; v=json.load(open('variants.json'))
for k, r in v.items(): print(k, 'best', r.get('best_val_loss'), 'at', r.get('best_step'), r.get('val_loss_by_strength'))"
