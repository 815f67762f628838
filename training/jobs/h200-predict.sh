#!/usr/bin/env bash
# GPU job, evaluation call (after h200-train.sh, same warm machine): every row of the quality table on the 43 dev
# tasks and 16 train tasks -> $OUT/predictions.json; plus trained LoRAs of 30 train and 30 dev tasks (fp16) for
# `hyperlora eval strategy` on the CPU.
set -u
R=$(pwd)
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
W=/tmp/work
G=""; for k in cvae sg; do [ -f $W/$k/cvae.json ] && G="$G --generator $k=$k:$W/$k"; done; echo "extra generators:$G"
timeout 420 python3 -m training.pipeline --stages predict --work $W --base-model /tmp/hf --data /tmp/stage/sni --embeddings /tmp/stage/emb.safetensors --device cuda --dtype bfloat16 --eval-batch 256 --train-sample 16 $G > $W/logs/predict.log 2>&1
echo "predict rc=$?"
gzip -c $W/predictions.json > $OUT/predictions.json.gz
python3 - <<'PY'
import json, pathlib, torch
from safetensors.torch import load_file, save_file
W = pathlib.Path("/tmp/work"); out = pathlib.Path("/tmp/libsubset"); out.mkdir(exist_ok=True)
m = json.load(open("/tmp/stage/sni/manifest.json"))
pick = {"lora-library": m["train"][::10][:30], "dev-library": m["dev"][:30]}
for lib, names in pick.items():
    for n in names:
        src = W / lib / n
        if not (src / "adapter_model.safetensors").is_file():
            continue
        d = out / lib / n; d.mkdir(parents=True, exist_ok=True)
        sd = {k: v.half().contiguous() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
        save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        for f in ("adapter_config.json", "hyperlora.json"):
            if (src / f).is_file(): (d / f).write_text((src / f).read_text())
PY
tar -C /tmp/libsubset -cf - . | split -b 15M -d - $OUT/libsubset.tar.
tar -czf $OUT/logs-predict.tgz -C $W logs
ls -la $OUT
tr '\r' '\n' < $W/logs/predict.log | grep -v "it/s\|s/it" | tail -4
