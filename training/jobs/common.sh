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
