#!/usr/bin/env bash
# GPU job (final run), eval call: every row of the quality table on the dev tasks and a train sample.
set -u
cd /tmp
export PYTHONPATH=/tmp/site:/tmp/code PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
W=/tmp/work
timeout 400 python3 -m training.pipeline --stages predict --work $W --base-model /tmp/stage --data /tmp/data --embeddings /tmp/emb.safetensors --device cuda --dtype bfloat16 --max-prompt-tokens 192 --eval-batch 128 --train-sample 16 --generator cvae=cvae:$W/cvae --generator sg=sg:$W/sg > $W/logs/predict.log 2>&1
echo "predict rc=$?"
cp $W/predictions.json $OUT/ 2>/dev/null; tar -czf $OUT/logs-final.tgz -C $W logs
tr '\r' '\n' < $W/logs/predict.log | grep -v "it/s\|s/it" | tail -4; ls -la $OUT
