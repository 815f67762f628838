#!/usr/bin/env bash
# GPU job (final run), training call: library -> (recon, cvae, sg); multitask; two SFT variants; at once on one H200.
set -u
cd /tmp
export PYTHONPATH=/tmp/site:/tmp/code PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
W=/tmp/work; mkdir -p $W/logs
C="--work $W --base-model /tmp/stage --data /tmp/data --embeddings /tmp/emb.safetensors --device cuda --dtype bfloat16 --max-prompt-tokens 192"
P="python3 -m training.pipeline"
(
  timeout 300 $P --stages library $C --tasks-per-batch 73 --library-per-task 4 --library-steps 100 --library-lr 1e-3 > $W/logs/library.log 2>&1
  echo "library rc=$?"
  ( timeout 230 $P --stages recon $C --recon-steps 6000 --recon-lr 1e-3 > $W/logs/recon.log 2>&1; echo "recon rc=$?" ) &
  for k in cvae sg; do
    ( timeout 200 python3 -m training.cvae --kind $k --library $W/lora-library --out $W/$k --embeddings /tmp/emb.safetensors --device cuda --steps 3000 > $W/logs/$k.log 2>&1; echo "$k rc=$?" ) &
  done
  wait
) &
( timeout 300 $P --stages multitask $C --multitask-steps 300 --multitask-batch 64 --multitask-lr 3e-4 > $W/logs/multitask.log 2>&1; echo "multitask rc=$?" ) &
S="--stages sft --val-tasks 12 --eval-every 25 --tasks-per-step 32 --sft-per-task 4"
( timeout 480 $P $C $S --sft-out t2l-sft --sft-steps 400 --hypernet-lr 5e-4 > $W/logs/t2l-sft.log 2>&1; echo "t2l-sft rc=$?" ) &
( timeout 480 $P $C $S --sft-out t2l-sft-d30 --sft-steps 600 --hypernet-lr 2e-4 --dropout 0.3 > $W/logs/t2l-sft-d30.log 2>&1; echo "t2l-sft-d30 rc=$?" ) &
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $W
for d in t2l-recon t2l-sft t2l-sft-d30 cvae sg; do [ -d $d ] && tar -cf $OUT/$d.tar $d; done
tar -czf $OUT/misc.tgz multitask logs timings-*.json lora-library/*/meta.json 2>/dev/null
ls -la $OUT
for f in logs/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "stage |validation loss|Error|wrote" | tail -4 | cut -c1-200; done
