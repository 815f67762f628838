#!/usr/bin/env bash
# GPU job: the adapter strength with in-context examples (training/strength.py) for the shipped T2L checkpoint,
# recorded into it (--record; the quality table's predict then adds its row).
# Staged first (../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb-small.safetensors, the
# embeddings of the held-out train tasks and the dev tasks only). Back in $OUT: strength.json.
set -u
R=$(pwd)
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mkdir -p /tmp/work/logs
[ -d /tmp/stage/sni ] || tar -C /tmp/stage -xzf /tmp/stage/sni.tgz
[ -f /tmp/hf/config.json ] || { python3 -m generator.models /tmp/stage /tmp/hf > /tmp/work/logs/convert.log 2>&1 &&
  ln -sf /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/hf/; }
timeout 300 python3 -m training.strength --checkpoint generator/checkpoints/smollm2-t2l --name t2l-sft-m \
  --base-model /tmp/hf --data /tmp/stage/sni --embeddings /tmp/stage/emb-small.safetensors --device cuda \
  --dtype bfloat16 --eval-batch 256 --record --out /tmp/work/strength > /tmp/work/logs/strength.log 2>&1
echo "strength rc=$?"
cp /tmp/work/strength/strength.json generator/checkpoints/smollm2-t2l/hypernet.json $OUT/ 2>/dev/null  # the recorded checkpoint config
tr '\r' '\n' < /tmp/work/logs/strength.log | grep -E "strength|Error|error" | tail -8
