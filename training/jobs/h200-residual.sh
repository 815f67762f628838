#!/usr/bin/env bash
# GPU job, training call (round 4): Text-to-LoRA as a residual on the multi-task LoRA.
# Staged first (../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb.safetensors ...).
#   1. the multi-task LoRA again, without the 24 train tasks SFT holds out (same recipe as the shipped one:
#      400 steps x 64, lr 3e-4), so the held-out loss that picks a variant is still on unseen tasks;
#   2. two SFT runs of T2L M whose adapters hold that LoRA as fixed leading ranks (rank 8 + generated rank 8),
#      lr 5e-4 (the shipped M's) and 2e-4; step 0 (the multi-task LoRA alone) is a candidate too;
#   3. training.strength on the shipped T2L: the strength rule from each prompt's own examples against the
#      fixed 0.75, by held-out train-task loss (never dev).
# Back in $OUT: the residual checkpoints, the held-out multi-task LoRA, variants.json, strength.json, logs.
set -u
. training/jobs/common.sh
( timeout 120 python3 -m training.strength --checkpoint generator/checkpoints/smollm2-t2l --base-model /tmp/hf \
    --data /tmp/stage/sni --embeddings $EMB --device cuda --dtype bfloat16 --out $W/strength > $W/logs/strength.log 2>&1
  echo "strength rc=$?" ) &
timeout 150 $P --stages multitask $C --multitask-out multitask-holdout --multitask-holdout 24 --multitask-steps 400 \
  --multitask-batch 64 --multitask-lr 3e-4 > $W/logs/multitask-holdout.log 2>&1
echo "multitask-holdout rc=$? $(date +%T)"
S="--stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600 --base-adapter $W/multitask-holdout"
for v in "t2l-res-m 5e-4" "t2l-res-m-lr2 2e-4"; do set -- $v
  ( timeout ${SFT_S:-380} $P $C $S --sft-out $1 --hypernet-lr $2 > $W/logs/$1.log 2>&1; echo "$1 rc=$? $(date +%T)" ) &
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $W
python3 -m training.variants $W > $W/variants.json
tar -cf - t2l-res-* multitask-holdout 2>/dev/null | split -b 15M -d - $OUT/ckpt.tar.
cp variants.json $OUT/; cp strength/strength.json $OUT/ 2>/dev/null
tar -czf $OUT/logs-residual.tgz logs variants.json 2>/dev/null
ls -la $OUT
for f in logs/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "stage |validation loss|strength|Error|error|wrote" | tail -4 | cut -c1-220; done
python3 -c "
import json; v=json.load(open('variants.json'))
for k, r in v.items(): print(k, 'best', r['best_val_loss'], 'at', r['best_step'], 'curve', r['val_curve'][:3], '...', r['val_curve'][-2:])"
