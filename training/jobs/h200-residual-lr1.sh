#!/usr/bin/env bash
set -u
# GPU job, one more residual variant (lr 1e-4, 400 steps) on the held-out multi-task LoRA that h200-residual.sh
# trained (carry runs/h200v4/multitask-holdout); ships nothing itself: if its held-out loss beats the shipped
# checkpoint it records its strength and adds its rows to the predictions (both back in $OUT).
OMP_NUM_THREADS=2 . training/jobs/common.sh
cp -r runs/h200v4/multitask-holdout $W/multitask-holdout
N=t2l-res-m-lr1
timeout 250 $P $C --stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 400 \
  --base-adapter $W/multitask-holdout --sft-out $N --hypernet-lr 1e-4 > $W/logs/$N.log 2>&1; echo "sft rc=$?"
python3 -m training.variants $W > $OUT/variants-lr1.json
BEST=$(python3 -c "import json; print(json.load(open('$W/$N/hypernet.json'))['extra']['best_val_loss'])")
echo "best held-out loss $BEST (shipped 1.945)"; grep "validation loss" $W/logs/$N.log | tail -3 | cut -c 60-
if python3 -c "import sys; sys.exit(0 if $BEST < 1.9449 else 1)"; then
  timeout 100 python3 -m training.strength --checkpoint $W/$N --record --base-model /tmp/hf --data /tmp/stage/sni \
    --embeddings $EMB --device cuda --dtype bfloat16 --out $W/$N-strength > $W/logs/strength.log 2>&1; echo "strength rc=$?"
  timeout 80 $P --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB --device cuda \
    --dtype bfloat16 --eval-batch 512 --max-per-task 40 --predict-only $N --merge-into results/predictions.json.gz \
    > $W/logs/predict.log 2>&1; echo "predict rc=$?"
  gzip -c $W/predictions.json > $OUT/predictions.json.gz
  tar -cf $OUT/ckpt.tar -C $W $N
fi
ls $OUT
