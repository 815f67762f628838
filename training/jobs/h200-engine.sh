#!/usr/bin/env bash
# GPU job (#12): the decode benchmark, every row in one run (serve/bench_decode.py: the transformers static+compile
# anchor, PEFT mixed batch, the dynamic engine, the static graph-captured step at batch 32 and 256, the same step
# through torch.compile, greedy agreement). Random weights of SmolLM2-135M's shapes: needs only torch/transformers/peft
# and typer (staged with the serving wheels).
# -> $OUT/bench_engine_cuda.{json,log}
set -u
. training/jobs/common.sh
timeout ${ENGINE_S:-500} python3 hyperlora.py bench serve --engine-only --device cuda --dtype bf16 --gguf-dir /tmp/stage \
  --batch 32 --adapters 32 --new-tokens 64 2>&1 | tr '\r' '\n' | grep -v "it/s\|Warning\|warn(" | tee $OUT/bench_engine_cuda.log | tail -32
cp results/bench_engine_cuda.json $OUT/ 2>/dev/null
