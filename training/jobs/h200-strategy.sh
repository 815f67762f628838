#!/usr/bin/env bash
# GPU job (#13): `hyperlora eval strategy` with the shipped checkpoints, on cuda (the CPU run takes the 2-core
# machine for a long while). Needs, staged first: the model and the serving wheels (faiss-cpu, the embedder
# package ...) as for h200-serve.sh, and --file runs/strategy-libs.tgz (runs/h200/libsample: 60 trained train-task
# LoRAs; runs/h200/libsubset/dev-library: 30 dev-task LoRAs, for setting (c)), and rouge-score with nltk and absl-py:
# rouge-score is an sdist only, so build its wheel here (`pip wheel --no-deps rouge-score==0.1.2 -w DIR`) and stage
# it with --file (the first try, without it, stopped at `import rouge_score`).
# -> $OUT/strategy.{json,md}
set -u
. training/jobs/common.sh
[ -d /tmp/stage/libsample ] || tar -C /tmp/stage -xzf /tmp/stage/strategy-libs.tgz
python3 -c "import rouge_score" 2>/dev/null || pip install -q --no-deps --target /tmp/site /tmp/stage/rouge_score-*.whl
timeout ${STRATEGY_S:-400} python3 hyperlora.py eval strategy --library /tmp/stage/libsample \
  --dev-library /tmp/stage/dev-library --sni /tmp/stage/sni --base-model /tmp/hf --tasks 30 --inputs 8 \
  --device cuda --out-dir $OUT 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -14
