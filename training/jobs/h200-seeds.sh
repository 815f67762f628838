#!/usr/bin/env bash
# GPU job, training call (round 8, #10): the shipped recipe unchanged (residual on the held-out multi-task LoRA, M,
# lr 2e-4, 32 tasks x 2, 600 steps) with sampling seeds 1, 2 and 3 and the shipped run's initialisation
# (--init-seed 0; the shipped run is seed 0), side by side. Two questions, both on held-out train tasks only:
#   how much of the shipped held-out loss (1.945 at step 350; the multi-task LoRA alone, step 0, is 2.004) is the
#   draw; and does averaging runs of one recipe help: their weight average (a soup, one network, served at no extra
#   cost) and the mean of their adapters. h200-average.sh measures those in the next call.
# Staged first: ../shared/tools/stage-for-gpu --model --file runs/sni.tgz --file runs/emb.safetensors
#   --file runs/round5-bases.tgz (multitask-holdout/: the shipped checkpoint's fixed base ranks, exported with
#   generator.hypernet.soup.base_adapter; the same values the shipped run trained on, as fp16).
# -> $OUT: variants.json, logs, the three checkpoints (split tar)
set -u
. training/jobs/common.sh
sft_variants "t2l-seed1 --seed 1 --init-seed 0" "t2l-seed2 --seed 2 --init-seed 0" "t2l-seed3 --seed 3 --init-seed 0"
cd $W
tar -cf - t2l-seed* | split -b 15M -d - $OUT/ckpt.tar.
tar -czf $OUT/logs-seeds.tgz logs variants.json
