#!/usr/bin/env bash
# GPU job, evaluation call (after h200-train.sh, same warm machine): the quality table's rows on all 43 dev tasks
# (every dev instance is a test instance: no generator trains on dev; at most 40 per task) and 16 train tasks ->
# $OUT/predictions.json.gz. Rows: the baselines, the multi-task LoRA, the shipped T2L (smollm2-t2l, as
# t2l-sft-m) with its recorded strength beside examples, T2L recon, CVAE and SG from the full library, and any
# SFT variant whose held-out train-task loss beat the shipped one (its strength with examples chosen first,
# training/strength.py, on held-out train tasks).
set -u
R=$(pwd)
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
W=/tmp/work
rm -rf $W/t2l-sft-m && cp -r generator/checkpoints/smollm2-t2l $W/t2l-sft-m
SHIPPED=$(python3 -c "import json; print(json.load(open('$W/t2l-sft-m/hypernet.json'))['extra']['best_val_loss'])")
for d in $W/t2l-sft-m-wd $W/t2l-sft-l2; do
  [ -f $d/hypernet.json ] || continue
  if python3 -c "import json,sys; sys.exit(0 if json.load(open('$d/hypernet.json'))['extra']['best_val_loss'] < $SHIPPED else 1)"; then
    timeout 120 python3 -m training.strength --checkpoint $d --record --base-model /tmp/hf --data /tmp/stage/sni \
      --embeddings /tmp/stage/emb.safetensors --device cuda --dtype bfloat16 --out $d-strength > $W/logs/$(basename $d)-strength.log 2>&1
    echo "$(basename $d) strength rc=$?"
  else
    mv $d $W/lost-$(basename $d)  # kept out of the table: held-out loss above the shipped checkpoint's
  fi
done
G=""; for k in cvae sg; do [ -f $W/$k/cvae.json ] && G="$G --generator $k=$k:$W/$k"; done; echo "extra generators:$G"
timeout ${PRED_S:-480} python3 -m training.pipeline --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni \
  --embeddings /tmp/stage/emb.safetensors --device cuda --dtype bfloat16 --eval-batch 512 --max-per-task 40 \
  --train-sample 16 $G > $W/logs/predict.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
for d in $W/t2l-sft-m-wd $W/t2l-sft-l2; do [ -f $d/hypernet.json ] && cp $d/hypernet.json $OUT/$(basename $d).json; done
tar -czf $OUT/logs-predict.tgz -C $W logs
ls -la $OUT
tr '\r' '\n' < $W/logs/predict.log | grep -v "it/s\|s/it" | tail -4
