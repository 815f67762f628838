#!/usr/bin/env bash
# GPU job, evaluation call after h200-round6.sh (same warm machine): for each round-6 variant, its strengths
# (training.strength --record: beside 2 examples by held-out train-task loss; without examples from SFT's own
# held-out record), then its dev rows merged into the committed results/predictions.json.gz. Every trained variant is
# reported; which one ships is decided by the held-out loss alone.
# -> $OUT/predictions.json.gz, the variants' hypernet.json files, strength JSONs, logs
set -u
OMP_NUM_THREADS=4 . training/jobs/common.sh
V=${V:-t2l-r6-mm25,t2l-r6-mm50,t2l-r6-mm25-ex50}; PV=${PV:-$V}  # strengths for V, dev rows for PV
[ -d $W/t2l-r6-mm25 ] || tar -C $W -xzf /tmp/stage/r6.tgz  # a fresh machine: the checkpoints staged (--file runs/h200v6/r6.tgz)
for n in ${V//,/ }; do
  ( timeout 200 python3 -m training.strength --checkpoint $W/$n --record --base-model /tmp/hf --data /tmp/stage/sni \
      --embeddings $EMB --device cuda --dtype bfloat16 --out $W/$n-strength > $W/logs/strength-$n.log 2>&1
    echo "$n strength rc=$?"; cp $W/$n-strength/strength.json $OUT/strength-$n.json 2>/dev/null ) &
done
wait
timeout 360 $P --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB \
  --device cuda --dtype bfloat16 --eval-batch 512 --max-per-task 40 --no-example-strength \
  --predict-only $PV --merge-into results/predictions.json.gz > $W/logs/predict-round6.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
for n in ${V//,/ }; do cp $W/$n/hypernet.json $OUT/$n.hypernet.json; done
tar -czf $OUT/logs-predict6.tgz -C $W logs
tr '\r' '\n' < $W/logs/predict-round6.log | grep -v "it/s\|s/it" | tail -3
