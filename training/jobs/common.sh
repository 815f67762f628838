# Sourced by the GPU job scripts (run from the repository root on the warm, staged machine): the environment,
# the staged data unpacked, the GGUF converted once to a plain HF dir (/tmp/hf), and the shared pipeline flags.
R=$(pwd)
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
W=/tmp/work; mkdir -p $W/logs
[ -d /tmp/stage/sni ] || [ ! -f /tmp/stage/sni.tgz ] || tar -C /tmp/stage -xzf /tmp/stage/sni.tgz
[ -f /tmp/hf/config.json ] || { python3 -m generator.models /tmp/stage /tmp/hf > $W/logs/convert.log 2>&1 &&
  ln -sf /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/hf/; }
EMB=${EMB:-/tmp/stage/emb.safetensors}  # a job may stage another (e.g. with relabelled copies)
C="--work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB --device cuda --dtype bfloat16 --max-prompt-tokens 384"
P="python3 -m training.pipeline"

# SFT runs of the shipped recipe side by side (a residual on the held-out multi-task LoRA, M, lr 2e-4, 32 tasks x 2,
# 600 steps, 24 train tasks held out), one per "NAME FLAGS..." argument; then $W/variants.json, a copy in $OUT and a
# line per run. Needs runs/round5-bases.tgz staged.
sft_variants() {
  [ -d $W/multitask-holdout ] || tar -C $W -xzf /tmp/stage/round5-bases.tgz
  local S="--stages sft --val-tasks 24 --eval-every 25 --tasks-per-step 32 --sft-per-task 2 --sft-steps 600
   --hypernet-lr 2e-4 --base-adapter $W/multitask-holdout" v N
  for v in "$@"; do set -- $v; N=$1; shift
    ( timeout ${SFT_S:-520} $P $C $S --sft-out $N "$@" > $W/logs/$N.log 2>&1; echo "$N rc=$? $(date +%T)" ) &
  done
  sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  wait
  python3 -m training.variants $W > $W/variants.json && cp $W/variants.json $OUT/
  python3 -m training.variants $W --summary
}
