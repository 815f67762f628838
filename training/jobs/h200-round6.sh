#!/usr/bin/env bash
# GPU job, training call (round 6, #10): adapters that follow the prompt on tasks they were not trained on.
# On an unseen task a generated adapter is imperfect, and on some dev tasks it imposes a training task's answer words
# over the instruction and the examples. Mismatch training simulates that: for a share of each step's tasks the
# adapter is generated from a description of one of the task's 8 nearest other train tasks, while the prompt
# (instruction, examples, answer) stays the task's own (`--mismatch-rate`). Three runs of the shipped recipe
# (residual on the held-out multi-task LoRA, M, lr 2e-4, 32 tasks x 2, 600 steps), decided before any answer:
#   t2l-r6-mm25       mismatch 0.25
#   t2l-r6-mm50       mismatch 0.5
#   t2l-r6-mm25-ex50  mismatch 0.25, and one or two in-context examples in half the samples (not a third)
# Each keeps its step with the lowest held-out train-task loss; a variant replaces the shipped one (1.945) only if
# its held-out loss is lower. Never dev.
# Staged first: ../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb.safetensors
#   --file runs/round5-bases.tgz (runs/h200/multitask + runs/h200v4/multitask-holdout).
# -> $OUT: variants.json, logs, the three checkpoints (split tar)
set -u
. training/jobs/common.sh
[ -d $W/multitask-holdout ] || tar -C $W -xzf /tmp/stage/round5-bases.tgz
S="--stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600 --hypernet-lr 2e-4
   --base-adapter $W/multitask-holdout"
for v in "t2l-r6-mm25 --mismatch-rate 0.25" "t2l-r6-mm50 --mismatch-rate 0.5" \
         "t2l-r6-mm25-ex50 --mismatch-rate 0.25 --example-rate 0.5"; do set -- $v; N=$1; shift
  ( timeout ${SFT_S:-520} $P $C $S --sft-out $N "$@" > $W/logs/$N.log 2>&1; echo "$N rc=$? $(date +%T)" ) &
done
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $W
python3 -m training.variants $W > $W/variants.json
tar -cf - t2l-r6-* | split -b 15M -d - $OUT/ckpt.tar.
cp variants.json $OUT/; tar -czf $OUT/logs-round6.tgz logs variants.json
for f in logs/t2l-r6-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "validation loss|strength|Error|error" | tail -3 | cut -c1-200; done
python3 -c "
import json; v=json.load(open('variants.json'))
for k, r in v.items(): print(k, 'best', r.get('best_val_loss'), 'at', r.get('best_step'), r.get('val_loss_by_strength'))"
