#!/usr/bin/env bash
# GPU job, training call (data version 2; every prompt with the task's instruction, generator/prompt.py).
# Staged first (tar -C ../shared/data -czf runs/sni.tgz sni; ../shared/tools/stage-for-gpu --model --file runs/sni.tgz
# --file runs/emb.safetensors): /tmp/stage holds the GGUF, sni.tgz and emb.safetensors. Carry runs/h200/multitask
# (the multi-task LoRA trained in the first round; kept in /tmp/work for the predict call).
# Within one 10-minute call on one H200:
#   library (all 297 train tasks, 50 per batched forward) -> recon, cvae, sg (from the full library)
#   beside it, two SFT variants not tried before: M with weight decay 0.1 + dropout 0.2, and L at lr 2e-4
# Back in $OUT: recon, cvae, sg, the SFT variants whose held-out train-task loss beats the shipped checkpoint's
# (never chosen by dev), variants.json and logs.
set -u
. training/jobs/common.sh
[ -d $W/multitask ] || cp -r runs/h200/multitask $W/multitask
(
  timeout ${LIB_S:-390} $P --stages library $C --tasks-per-batch ${TPB:-50} --library-per-task 4 --library-steps 100 --library-lr 1e-3 > $W/logs/library.log 2>&1
  echo "library rc=$? tasks=$(ls $W/lora-library/*/meta.json | wc -l)"
  ( timeout 160 $P --stages recon $C --recon-steps 4000 --recon-lr 1e-3 > $W/logs/recon.log 2>&1; echo "recon rc=$?" ) &
  for k in cvae sg; do
    ( timeout 160 python3 -m training.cvae --kind $k --library $W/lora-library --out $W/$k --embeddings $EMB --device cuda --steps 3000 > $W/logs/$k.log 2>&1; echo "$k rc=$?" ) &
  done
  wait
) &
S="--stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600"
sft() { name=$1; shift; ( timeout ${SFT_S:-560} $P $C $S --sft-out $name "$@" > $W/logs/$name.log 2>&1; echo "$name rc=$?" ) & }
if [ "${SFT:-1}" = 1 ]; then  # SFT=0: the library alone (with both variants beside it, 99 tasks a batch ran out of memory)
  sft t2l-sft-m-wd --hypernet-lr 5e-4 --weight-decay 0.1 --dropout 0.2
  sft t2l-sft-l2 --variant L --hypernet-lr 2e-4
fi
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $W
python3 -m training.variants $W > $W/variants.json
SHIPPED=$(python3 -c "import json; print(json.load(open('$R/generator/checkpoints/smollm2-t2l/hypernet.json'))['extra']['best_val_loss'])")
better=$(python3 -c "
import json; v=json.load(open('variants.json'))
print(' '.join(k for k, r in v.items() if r['mode']=='sft' and r['best_val_loss'] and r['best_val_loss'] < $SHIPPED))")
echo "shipped held-out loss $SHIPPED; variants below it: ${better:-none}"
tar -cf - t2l-recon cvae sg $better 2>/dev/null | split -b 15M -d - $OUT/ckpt.tar.
tar -czf $OUT/logs.tgz logs variants.json timings-*.json 2>/dev/null
ls -la $OUT
for f in logs/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "stage |validation loss|strength|Error|error|wrote" | tail -3 | cut -c1-220; done
