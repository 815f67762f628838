#!/usr/bin/env bash
# GPU job, evaluation call after h200-round5.sh (same warm machine):
#   1. training.strength --record on A (t2l-res-ema, the held-out run): its strength beside 2 examples, by held-out
#      train-task loss; B takes the shipped recipe's recorded 0.75, C takes A's;
#   2. dev rows for A, B and C, merged into the committed results/predictions.json.gz (other rows kept as they are).
# -> $OUT/predictions.json.gz, strength.json, the three hypernet.json files, logs
set -u
OMP_NUM_THREADS=8 . training/jobs/common.sh
timeout 200 python3 -m training.strength --checkpoint $W/t2l-res-ema --record --base-model /tmp/hf --data /tmp/stage/sni \
  --embeddings $EMB --device cuda --dtype bfloat16 --out $W/ema-strength > $W/logs/strength-ema.log 2>&1
echo "strength rc=$?"; grep -E "strength|chosen" $W/logs/strength-ema.log | tail -7 | cut -c 40-
python3 - <<'PY'
import json
def rec(src, dst, why):
    s = json.load(open(src))["extra"].get("strength_with_examples")
    p = f"/tmp/work/{dst}/hypernet.json"; d = json.load(open(p))
    if s is not None:
        d["extra"].update(strength_with_examples=s, strength_from=why); json.dump(d, open(p, "w"), indent=2)
    print(dst, "strength with examples", s, "from", why)
rec("generator/checkpoints/smollm2-t2l/hypernet.json", "t2l-res-full", "t2l-res-m-lr2 (held-out run of this recipe)")
rec("/tmp/work/t2l-res-ema/hypernet.json", "t2l-res-full-ema", "t2l-res-ema (held-out run of this recipe)")
PY
timeout 330 $P --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings $EMB \
  --device cuda --dtype bfloat16 --eval-batch 512 --max-per-task 40 --no-example-strength \
  --predict-only t2l-res-ema,t2l-res-full,t2l-res-full-ema --merge-into results/predictions.json.gz \
  > $W/logs/predict-round5.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
for n in t2l-res-ema t2l-res-full t2l-res-full-ema; do cp $W/$n/hypernet.json $OUT/$n.hypernet.json; done
cp $W/ema-strength/strength.json $OUT/ 2>/dev/null; tar -czf $OUT/logs-predict5.tgz -C $W logs
tr '\r' '\n' < $W/logs/predict-round5.log | grep -v "it/s\|s/it" | tail -3
