#!/usr/bin/env bash
# GPU job, training call (round 7, #10): relabelled copies of classification tasks (training.relabel), so adapters
# take the answer words from the instruction instead of imposing those of the tasks they resemble. A copy keeps a
# task's inputs and meaning, answers with other words, and its definition says which. Three runs of the shipped
# recipe (residual on the held-out multi-task LoRA, M, lr 2e-4, 32 tasks x 2, 600 steps), decided before any answer:
#   t2l-r7-rl1       one relabelled copy of each of the 88 qualifying tasks
#   t2l-r7-rl2       two copies each
#   t2l-r7-rl2-ex50  two copies, and one or two in-context examples in half the samples (not a third)
# Each keeps its step with the lowest held-out train-task loss (held-out tasks and their copies are never trained
# on); a variant replaces the shipped one (1.945) only if its held-out loss is lower. Never dev.
# Staged first: ../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb-relabel.safetensors
#   --file runs/round5-bases.tgz (emb-relabel: `python -m training.relabel --embeddings runs/emb.safetensors
#   --out runs/emb-relabel.safetensors`, the copies' description embeddings added; the GPU machine has no encoder)
# -> $OUT: variants.json, logs, the three checkpoints (split tar); then h200-variants-predict.sh
set -u
EMB=/tmp/stage/emb-relabel.safetensors
. training/jobs/common.sh
sft_variants "t2l-r7-rl1 --relabel-copies 1" "t2l-r7-rl2 --relabel-copies 2" \
  "t2l-r7-rl2-ex50 --relabel-copies 2 --example-rate 0.5"
cd $W
tar -cf - t2l-r7-* | split -b 15M -d - $OUT/ckpt.tar.
tar -czf $OUT/logs-round7.tgz logs variants.json
