#!/usr/bin/env bash
# GPU job, training call (#10): how much of the shipped checkpoint's held-out loss (1.945 at step 350; the
# multi-task LoRA alone, its step 0, is 2.004) is the draw? The shipped recipe unchanged (residual on the held-out
# multi-task LoRA, M, lr 2e-4, 32 tasks x 2, 600 steps) with seeds 1, 2 and 3 (sampling and initialisation; the
# shipped run is seed 0), side by side. Nothing here ships: it calibrates the rule that picks variants.
# Staged first as for h200-round7.sh (any staged embeddings file that covers the train tasks will do).
# -> $OUT: variants.json, logs
set -u
EMB=${EMB:-$(ls /tmp/stage/emb*.safetensors | head -1)}
. training/jobs/common.sh
[ -d $W/multitask-holdout ] || tar -C $W -xzf /tmp/stage/round5-bases.tgz
S="--stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600 --hypernet-lr 2e-4
   --base-adapter $W/multitask-holdout"
for seed in 1 2 3; do N=t2l-seed$seed
  ( timeout ${SFT_S:-520} $P $C $S --sft-out $N --seed $seed > $W/logs/$N.log 2>&1; echo "$N rc=$? $(date +%T)" ) &
done
wait
cd $W
python3 -m training.variants $W > $W/variants.json
cp variants.json $OUT/; tar -czf $OUT/logs-seeds.tgz logs variants.json
python3 -c "
import json; v=json.load(open('variants.json'))
for k, r in v.items():
    c = [x[1] for x in r['val_curve']]; m = [x[1] for x in r['val_curve'] if 200 <= x[0] <= 450]
    print(k, 'best', r.get('best_val_loss'), 'at', r.get('best_step'), 'mean 200-450', round(sum(m) / len(m), 4),
          'below step 0', sum(x < c[0] for x in c[1:]), 'of', len(c) - 1)"
