"""Hypernetwork checkpoints: `hypernet.json` (config) + `hypernet.safetensors` (weights). Never pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from generator.atomic import atomic_dir
from generator.hypernet.config import HypernetConfig
from generator.hypernet.model import Hypernet, build_hypernet
from generator.spec import ModelSpec

CONFIG_FILE, WEIGHTS_FILE = "hypernet.json", "hypernet.safetensors"


def save_checkpoint(net: Hypernet, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write config and weights atomically; weights are stored in `dtype` (fp16 keeps SmolLM2's under 30 MB)."""
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(net.cfg.to_dict(), indent=2))
    return Path(out_dir)


def load_checkpoint(path: str | Path, spec: ModelSpec | None = None, device: torch.device | str = "cpu") -> Hypernet:
    """Load a checkpoint; with `spec`, refuse one built for a base model of other shapes, naming both."""
    d = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"hypernetwork checkpoint {d} lacks {name}")
    cfg = HypernetConfig.from_dict(json.loads((d / CONFIG_FILE).read_text()))
    if spec is not None:
        why = spec.mismatch(cfg.spec, cfg.target_modules)
        if why:
            raise ValueError(f"checkpoint {d.name} was trained for {cfg.spec.name}, not {spec.name}: {why}")
    net = build_hypernet(cfg)
    state = {k: v.float() for k, v in load_file(str(d / WEIGHTS_FILE)).items()}
    net.load_state_dict(state)
    return net.to(device).eval()
