"""CVAE / SG checkpoints: JSON + safetensors only, written atomically. Never pickle.

  cvae.json           {"kind": "cvae" | "sg", "config": CVAEConfig}
  cvae.safetensors    weights and the normaliser (fp16 by default)
  experts.json        SG only: {"tasks": [...], "top_k", "temperature"}
  experts.safetensors SG only: "emb" (E, D), "mean" (E, Z), "var" (E, Z), float32
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from generator.atomic import atomic_dir
from generator.cvae.config import CVAEConfig
from generator.cvae.model import LoraCVAE
from generator.cvae.prior import ExpertBank
from generator.spec import ModelSpec

CONFIG_FILE, WEIGHTS_FILE = "cvae.json", "cvae.safetensors"
EXPERTS_JSON, EXPERTS_FILE = "experts.json", "experts.safetensors"


def save_cvae(net: LoraCVAE, out_dir: str | Path, experts: ExpertBank | None = None,
              dtype: torch.dtype = torch.float16) -> Path:
    """Write the model (kind "sg" when `experts` is given, else "cvae") atomically; returns the directory."""
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        kind = "sg" if experts is not None else "cvae"
        (tmp / CONFIG_FILE).write_text(json.dumps({"kind": kind, "config": net.cfg.to_dict()}, indent=2))
        if experts is not None:
            tensors = {"emb": experts.emb, "mean": experts.mean, "var": experts.var}
            save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
                      str(tmp / EXPERTS_FILE))
            meta = {"tasks": experts.tasks, "top_k": experts.top_k, "temperature": experts.temperature}
            (tmp / EXPERTS_JSON).write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def load_cvae(path: str | Path, spec: ModelSpec | None = None, device: torch.device | str = "cpu") -> LoraCVAE:
    """The CVAE of a `cvae` or `sg` checkpoint; with `spec`, refuse one built for other shapes, naming both."""
    d = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"CVAE checkpoint {d} lacks {name}")
    cfg = CVAEConfig.from_dict(json.loads((d / CONFIG_FILE).read_text())["config"])
    if spec is not None:
        why = spec.mismatch(cfg.spec, cfg.target_modules)
        if why:
            raise ValueError(f"checkpoint {d.name} was trained for {cfg.spec.name}, not {spec.name}: {why}")
    net = LoraCVAE(cfg)
    net.load_state_dict({k: v.float() for k, v in load_file(str(d / WEIGHTS_FILE)).items()})
    return net.to(device).eval()


def load_experts(path: str | Path, device: torch.device | str = "cpu") -> ExpertBank:
    d = Path(path)
    for name in (EXPERTS_JSON, EXPERTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} is not an SG checkpoint: it lacks {name} (train one with "
                                    f"`hyperlora train sg`)")
    meta = json.loads((d / EXPERTS_JSON).read_text())
    t = load_file(str(d / EXPERTS_FILE))
    return ExpertBank(list(meta["tasks"]), t["emb"], t["mean"], t["var"], int(meta["top_k"]),
                      float(meta["temperature"])).to(device)


def checkpoint_nbytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
