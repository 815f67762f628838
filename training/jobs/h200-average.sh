#!/usr/bin/env bash
# GPU job, evaluation call after h200-seeds.sh (same warm machine): training.average on the held-out train tasks
# (SFT's validation items, and the same tasks' test portions, "fresh", which picked nothing) for
#   avg4: the shipped network and seeds 1-3 (one initialisation): each, their soup, the mean of their adapters;
#   avg3: seeds 1-3 alone (in case the shipped run's initialisation was not the one --init-seed 0 gives).
# Rule, fixed before any result: a soup replaces the shipped network only if its fresh loss at its strength (chosen
# on SFT's items, as SFT chooses) is below the shipped network's fresh loss at its strength; of two, the lower.
# The mean of adapters costs K forward passes per adapter: measured, not served. Dev rows for both soups follow,
# reported whatever the rule says (dev chooses nothing).
# -> $OUT: avg4.json, avg3.json, the soups (tar), predictions.json.gz, logs
set -u
OMP_NUM_THREADS=4 . training/jobs/common.sh
A="python3 -m training.average --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB --device cuda
  --dtype bfloat16"
$A --members generator/checkpoints/smollm2-t2l $W/t2l-seed1 $W/t2l-seed2 $W/t2l-seed3 --out $W/avg4 \
  --save-soup $W/t2l-soup4 > $W/logs/avg4.log 2>&1; echo "avg4 rc=$?"; cp $W/avg4/average.json $OUT/avg4.json
$A --members $W/t2l-seed1 $W/t2l-seed2 $W/t2l-seed3 --out $W/avg3 --save-soup $W/t2l-soup3 > $W/logs/avg3.log 2>&1
echo "avg3 rc=$?"; cp $W/avg3/average.json $OUT/avg3.json
grep -h "strength" $W/logs/avg4.log $W/logs/avg3.log | grep -v INFO
tar -czf $OUT/soups.tgz -C $W t2l-soup4 t2l-soup3
timeout ${PRED_S:-300} $P --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB \
  --device cuda --dtype bfloat16 --eval-batch 512 --max-per-task 40 --no-example-strength \
  --predict-only t2l-soup4,t2l-soup3 --merge-into results/predictions.json.gz > $W/logs/predict-soups.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
tar -czf $OUT/logs-average.tgz -C $W logs
tr '\r' '\n' < $W/logs/predict-soups.log | grep -v "it/s\|s/it" | tail -3
