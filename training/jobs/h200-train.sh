#!/usr/bin/env bash
# GPU job, training call (data version 2; every prompt with the task's instruction, generator/prompt.py).
# Staged first (tar -C ../shared/data -czf runs/sni.tgz sni; ../shared/tools/stage-for-gpu --model --file runs/sni.tgz
# --file runs/emb.safetensors): /tmp/stage holds the GGUF, sni.tgz and emb.safetensors. All at once on one H200, within one 10-minute call:
#   library (297 LoRAs) -> recon, cvae, sg | dev-library (43, for `eval strategy`) -> multitask | 4 SFT variants
# Back in $OUT: the SFT variant with the lowest held-out loss (never chosen by dev), cvae, sg, multitask, logs.
set -u
R=$(pwd)
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
W=/tmp/work; mkdir -p $W/logs
[ -d /tmp/stage/sni ] || tar -C /tmp/stage -xzf /tmp/stage/sni.tgz
[ -f /tmp/hf/config.json ] || { python3 -m generator.models /tmp/stage /tmp/hf > $W/logs/convert.log 2>&1 &&
  ln -sf /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/hf/; }
EMB=/tmp/stage/emb.safetensors
C="--work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB --device cuda --dtype bfloat16 --max-prompt-tokens 384"
P="python3 -m training.pipeline"
(
  timeout 300 $P --stages library $C --tasks-per-batch 33 --library-per-task 4 --library-steps 100 --library-lr 1e-3 > $W/logs/library.log 2>&1
  echo "library rc=$?"
  ( timeout 200 $P --stages recon $C --recon-steps 6000 --recon-lr 1e-3 > $W/logs/recon.log 2>&1; echo "recon rc=$?" ) &
  for k in cvae sg; do
    ( timeout 200 python3 -m training.cvae --kind $k --library $W/lora-library --out $W/$k --embeddings $EMB --device cuda --steps 3000 > $W/logs/$k.log 2>&1; echo "$k rc=$?" ) &
  done
  wait
) &
(
  timeout 120 $P --stages dev-library $C --tasks-per-batch 43 --library-per-task 4 --library-steps 100 --library-lr 1e-3 > $W/logs/dev-library.log 2>&1; echo "dev-library rc=$?"
  timeout 300 $P --stages multitask $C --multitask-steps 400 --multitask-batch 64 --multitask-lr 3e-4 > $W/logs/multitask.log 2>&1; echo "multitask rc=$?"
) &
S="--stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600 --hypernet-lr 5e-4"
sft() { name=$1; shift; ( timeout 530 $P $C $S --sft-out $name "$@" > $W/logs/$name.log 2>&1; echo "$name rc=$?" ) & }
sft t2l-sft-m
sft t2l-sft-m-noise --embed-noise 0.02 --dropout 0.2
sft t2l-sft-l --variant L
# t2l-sft-m-wd (weight decay 0.1, dropout 0.3) did not fit in memory beside the others
sleep 120; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $W
python3 - <<'PY' > $W/variants.json
import json, glob
rows = {}
for f in sorted(glob.glob("t2l-*/hypernet.json")):
    e = json.load(open(f))["extra"]
    rows[f.split("/")[0]] = {k: e.get(k) for k in ("mode", "steps", "best_step", "best_val_loss", "final_loss",
                                                    "val_curve", "val_loss_by_strength", "train_tasks")}
print(json.dumps(rows, indent=1))
PY
best=$(python3 -c "import json; v=json.load(open('variants.json')); s={k: r for k, r in v.items() if r['mode']=='sft' and r['best_val_loss']}; print(min(s, key=lambda k: s[k]['best_val_loss']))")
echo "best SFT variant by held-out train-task loss: $best"
tar -cf - $best cvae sg multitask | split -b 15M -d - $OUT/ckpt.tar.
tar -czf $OUT/logs.tgz logs variants.json timings-*.json lora-library/*/meta.json 2>/dev/null
ls -la $OUT
for f in logs/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "stage |validation loss|strength|Error|error|wrote" | tail -3 | cut -c1-220; done
