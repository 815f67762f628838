#!/usr/bin/env bash
# GPU job, training call (round 6, #10): adapters that follow the prompt on tasks they were not trained on.
# On an unseen task a generated adapter is imperfect, and on some dev tasks it imposes a training task's answer words
# over the instruction and the examples. Mismatch training simulates that: for a share of each step's tasks the
# adapter is generated from a description of one of the task's 8 nearest other train tasks, while the prompt
# (instruction, examples, answer) stays the task's own (`--mismatch-rate`). Three runs of the shipped recipe
# (residual on the held-out multi-task LoRA, M, lr 2e-4, 32 tasks x 2, 600 steps), decided before any answer:
#   t2l-r6-mm25       mismatch 0.25
#   t2l-r6-mm50       mismatch 0.5
#   t2l-r6-mm25-ex50  mismatch 0.25, and one or two in-context examples in half the samples (not a third)
# Each keeps its step with the lowest held-out train-task loss; a variant replaces the shipped one (1.945) only if
# its held-out loss is lower. Never dev.
# Staged first: ../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb.safetensors
#   --file runs/round5-bases.tgz (runs/h200/multitask + runs/h200v4/multitask-holdout).
# -> $OUT: variants.json, logs, the three checkpoints (split tar)
set -u
. training/jobs/common.sh
sft_variants "t2l-r6-mm25 --mismatch-rate 0.25" "t2l-r6-mm50 --mismatch-rate 0.5" \
  "t2l-r6-mm25-ex50 --mismatch-rate 0.25 --example-rate 0.5"
cd $W
tar -cf - t2l-r6-* | split -b 15M -d - $OUT/ckpt.tar.
tar -czf $OUT/logs-round6.tgz logs variants.json
