#!/usr/bin/env bash
# GPU job, training call (#10): how much of the shipped checkpoint's held-out loss (1.945 at step 350; the
# multi-task LoRA alone, its step 0, is 2.004) is the draw? The shipped recipe unchanged (residual on the held-out
# multi-task LoRA, M, lr 2e-4, 32 tasks x 2, 600 steps) with seeds 1, 2 and 3 (sampling and initialisation; the
# shipped run is seed 0), side by side. Nothing here ships: it calibrates the rule that picks variants.
# Staged first as for h200-round7.sh (any staged embeddings file that covers the train tasks will do).
# -> $OUT: variants.json, logs (sft_variants in common.sh runs them)
set -u
EMB=${EMB:-$(ls /tmp/stage/emb*.safetensors | head -1)}
. training/jobs/common.sh
sft_variants "t2l-seed1 --seed 1" "t2l-seed2 --seed 2" "t2l-seed3 --seed 3"
tar -czf $OUT/logs-seeds.tgz -C $W logs variants.json
