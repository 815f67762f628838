#!/usr/bin/env bash
# GPU job: trained LoRAs for a sample of train tasks (every 10th, and every 10th from the 6th), for
# `hyperlora eval strategy` on the CPU. Staged first: --model --file runs/sni.tgz --file runs/library-only.txt.
set -u
R=$(pwd)
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1
W=/tmp/work; mkdir -p $W/logs
[ -d /tmp/stage/sni ] || tar -C /tmp/stage -xzf /tmp/stage/sni.tgz
[ -f /tmp/hf/config.json ] || { python3 -m generator.models /tmp/stage /tmp/hf > $W/logs/convert.log 2>&1 &&
  ln -sf /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/hf/; }
timeout 330 python3 -m training.pipeline --stages library --work $W --base-model /tmp/hf --data /tmp/stage/sni \
  --device cuda --dtype bfloat16 --max-prompt-tokens 384 --tasks-per-batch 53 --library-per-task 4 \
  --library-steps 100 --library-lr 1e-3 --library-only "$(cat /tmp/stage/library-only.txt)" > $W/logs/library.log 2>&1
echo "library rc=$? tasks done: $(ls $W/lora-library | wc -l)"
python3 - <<'PY'
import pathlib
from safetensors.torch import load_file, save_file
src_root, out = pathlib.Path("/tmp/work/lora-library"), pathlib.Path("/tmp/libsample")
for src in sorted(src_root.iterdir()):
    if not (src / "adapter_model.safetensors").is_file():
        continue
    d = out / src.name; d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.half().contiguous() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    for f in ("adapter_config.json", "hyperlora.json", "meta.json"):
        if (src / f).is_file(): (d / f).write_text((src / f).read_text())
PY
tar -C /tmp/libsample -cf - . | split -b 15M -d - $OUT/libsample.tar.
tr '\r' '\n' < $W/logs/library.log | grep -v "it/s" | tail -3; ls -la $OUT
