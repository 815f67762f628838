#!/usr/bin/env bash
# GPU job (after a residual T2L is shipped as generator/checkpoints/smollm2-t2l): record its strength beside in-context
# examples (training.strength --record: lowest held-out train-task loss, never dev), then add its recorded-strength
# row to the committed results/predictions.json.gz (only missing rows are generated).
# -> $OUT/hypernet.json (the checkpoint's config with the strength), strength.json, predictions.json.gz
set -u
OMP_NUM_THREADS=8 . training/jobs/common.sh
NAME=${NAME:-t2l-res-m-lr2}
rm -rf $W/$NAME && cp -r generator/checkpoints/smollm2-t2l $W/$NAME
timeout 150 python3 -m training.strength --checkpoint $W/$NAME --record --base-model /tmp/hf --data /tmp/stage/sni \
  --embeddings /tmp/stage/emb.safetensors --device cuda --dtype bfloat16 --out $W/$NAME-strength > $W/logs/strength.log 2>&1
echo "strength rc=$?"; grep -E "strength|chosen" $W/logs/strength.log | tail -8 | cut -c 40-
cp $W/$NAME/hypernet.json $OUT/hypernet.json; cp $W/$NAME-strength/strength.json $OUT/
timeout 200 python3 -m training.pipeline --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni \
  --embeddings /tmp/stage/emb.safetensors --device cuda --dtype bfloat16 --eval-batch 512 --max-per-task 40 \
  --predict-only $NAME --merge-into results/predictions.json.gz > $W/logs/predict-strength.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
tr '\r' '\n' < $W/logs/predict-strength.log | grep -v "it/s\|s/it" | tail -2
