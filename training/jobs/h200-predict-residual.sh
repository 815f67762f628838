#!/usr/bin/env bash
# GPU job, evaluation call after h200-residual.sh (same warm machine): adds rows to the committed
# results/predictions.json.gz (every other row is kept as it is; only missing methods are generated):
#   - the shipped T2L with its strength beside 2 examples chosen from those examples (x[examples]);
#   - the residual T2L variant with the lower held-out train-task loss (all its rows, x[examples] too);
#   - the multi-task LoRA trained without the 24 held-out train tasks (the residual's base).
# -> $OUT/predictions.json.gz
set -u
R=$(pwd)
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
W=/tmp/work
rm -rf $W/t2l-sft-m && cp -r generator/checkpoints/smollm2-t2l $W/t2l-sft-m
BEST=$(python3 -c "
import json; v=json.load(open('$W/variants.json'))
v={k: r for k, r in v.items() if k.startswith('t2l-res') and r['best_val_loss']}
print(min(v, key=lambda k: v[k]['best_val_loss']) if v else '')")
echo "residual variant evaluated: ${BEST:-none}"
timeout ${PRED_S:-420} python3 -m training.pipeline --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni \
  --embeddings /tmp/stage/emb.safetensors --device cuda --dtype bfloat16 --eval-batch 512 --max-per-task 40 \
  --predict-only t2l-sft-m${BEST:+,$BEST} --lora-row "multi-task LoRA (24 train tasks held out)=$W/multitask-holdout" \
  --merge-into results/predictions.json.gz > $W/logs/predict-residual.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
tar -czf $OUT/logs-predict.tgz -C $W logs
ls -la $OUT
tr '\r' '\n' < $W/logs/predict-residual.log | grep -v "it/s\|s/it" | tail -4
