#!/usr/bin/env bash
# GPU job, evaluation call after a round of SFT variants (h200-round6.sh, h200-round7.sh; same warm machine, or a
# fresh one with the round's checkpoints staged as A): for each variant in V, its strengths (training.strength
# --record: beside 2 examples by held-out train-task loss; without examples from SFT's own held-out record), then
# the dev rows of those in PV merged into the committed results/predictions.json.gz. Every trained variant is
# reported; which one ships is decided by the held-out loss alone.
#   V=t2l-r7-rl1,t2l-r7-rl2 PV=t2l-r7-rl2 A=/tmp/stage/r7.tgz bash training/jobs/h200-variants-predict.sh
# -> $OUT/predictions.json.gz, the variants' hypernet.json files, strength JSONs, logs
set -u
OMP_NUM_THREADS=4 . training/jobs/common.sh
V=${V:?name the variants, comma-separated}; PV=${PV:-$V}  # strengths for V, dev rows for PV
[ -d $W/${V%%,*} ] || tar -C $W -xzf ${A:?the variants are not in $W: stage their archive and name it A}
for n in ${V//,/ }; do
  ( timeout 200 python3 -m training.strength --checkpoint $W/$n --record --base-model /tmp/hf --data /tmp/stage/sni \
      --embeddings $EMB --device cuda --dtype bfloat16 --out $W/$n-strength > $W/logs/strength-$n.log 2>&1
    echo "$n strength rc=$?"; cp $W/$n-strength/strength.json $OUT/strength-$n.json 2>/dev/null ) &
done
wait
timeout 360 $P --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB \
  --device cuda --dtype bfloat16 --eval-batch 512 --max-per-task 40 --no-example-strength \
  --predict-only $PV --merge-into results/predictions.json.gz > $W/logs/predict-variants.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
for n in ${V//,/ }; do cp $W/$n/hypernet.json $OUT/$n.hypernet.json; done
tar -czf $OUT/logs-predict.tgz -C $W logs
tr '\r' '\n' < $W/logs/predict-variants.log | grep -v "it/s\|s/it" | tail -3
