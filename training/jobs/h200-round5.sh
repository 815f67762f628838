#!/usr/bin/env bash
# GPU job, training call (round 5): two ways past the shipped residual T2L (t2l-res-m-lr2: the multi-task LoRA
# without the 24 held-out train tasks as fixed ranks + a generated rank-8 residual, lr 2e-4, best held-out step 350).
#   A  t2l-res-ema       the same recipe with a moving average of the weights (--ema 0.99): a candidate by held-out
#                        train-task loss against the shipped 1.945 (its curve is noisy from step to step);
#   B  t2l-res-full      the shipped recipe refit on ALL 297 train tasks over the full multi-task LoRA (the one the
#                        quality table's "multi-task LoRA" row is), kept at the step the held-out run chose (350);
#   C  t2l-res-full-ema  A's recipe refit the same way, snapshotted every 25 steps: the snapshot at A's best step.
# The held-out runs choose the recipe and its step; the refits (no held-out tasks left) are what would ship.
# Staged first: ../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb.safetensors
#   --file runs/round5-bases.tgz (runs/h200/multitask + runs/h200v4/multitask-holdout).
# -> $OUT: variants.json, logs, the three checkpoints (split tar)
set -u
. training/jobs/common.sh
[ -d $W/multitask ] || tar -C $W -xzf /tmp/stage/round5-bases.tgz
S="--stages sft --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600 --hypernet-lr 2e-4"
SNAP=$(seq -s, 100 25 600)
( timeout ${SFT_S:-500} $P $C $S --val-tasks 24 --base-adapter $W/multitask-holdout --ema 0.99 --sft-out t2l-res-ema \
    > $W/logs/t2l-res-ema.log 2>&1; echo "A rc=$? $(date +%T)" ) &
( timeout ${SFT_S:-500} $P $C $S --base-adapter $W/multitask --snapshot-steps 350 --sft-out t2l-res-full-run \
    > $W/logs/t2l-res-full.log 2>&1; echo "B rc=$? $(date +%T)" ) &
( timeout ${SFT_S:-500} $P $C $S --base-adapter $W/multitask --ema 0.99 --snapshot-steps $SNAP \
    --sft-out t2l-res-full-ema-run > $W/logs/t2l-res-full-ema.log 2>&1; echo "C rc=$? $(date +%T)" ) &
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $W
python3 -m training.variants $W > $W/variants.json
BEST=$(python3 -c "import json; print(json.load(open('t2l-res-ema/hypernet.json'))['extra']['best_step'])")
echo "A's best step: $BEST"
rm -rf t2l-res-full t2l-res-full-ema
cp -r snapshots/t2l-res-full-run-step350 t2l-res-full
cp -r snapshots/t2l-res-full-ema-run-step$BEST t2l-res-full-ema 2>/dev/null || echo "no C snapshot at step $BEST"
tar -cf - t2l-res-ema t2l-res-full t2l-res-full-ema | split -b 15M -d - $OUT/ckpt.tar.
cp variants.json $OUT/; tar -czf $OUT/logs-round5.tgz logs variants.json
for f in logs/t2l-res-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "validation loss|strength|Error|error" | tail -3 | cut -c1-200; done
python3 -c "
import json; v=json.load(open('variants.json'))
for k, r in v.items(): print(k, 'best', r.get('best_val_loss'), 'at', r.get('best_step'), 'curve', r.get('val_curve', [])[:2], r.get('val_curve', [])[-2:])"
