"""Reading and writing the PEFT LoRA directory format (adapter_config.json + adapter_model.safetensors).

Keys are `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`, A `(r, d_in)`,
B `(d_out, r)`: what `PeftModel.from_pretrained` and vLLM's LoRA loader read. Only JSON and safetensors
are ever opened; a directory holding a pickle-based file is refused outright.

Beside those two files an adapter may carry `hyperlora.json` (PEFT and vLLM ignore it): its metadata, a flat
JSON object of strings. Its `instruction` is the text to put in front of every input (generator.prompt): a
generated adapter carries the description it was made from, since it complements that instruction.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from generator.atomic import atomic_dir
from generator.lora import LoraAdapter
from generator.peft_format import (  # noqa: F401 - re-exported
    CONFIG_NAME,
    MAX_SIDECAR_BYTES,
    PICKLE_SUFFIXES,
    SIDECAR_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    read_sidecar,
)
from generator.spec import MODULE_PARENTS, ModelSpec

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_(A|B)(?:\.default)?\.weight$"
)
# PEFT features that change the math; an adapter using them is not a plain LoRA and is refused.
_UNSUPPORTED = {"use_dora": True, "fan_in_fan_out": True}


def adapter_config(adapter: LoraAdapter) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": list(adapter.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    state = {}
    for m in adapter.target_modules:
        prefix = f"base_model.model.model.layers.{{}}.{MODULE_PARENTS[m]}.{m}"
        for i in range(adapter.n_layers):
            state[prefix.format(i) + ".lora_A.weight"] = adapter.a[m][i].contiguous()  # (r, d_in)
            state[prefix.format(i) + ".lora_B.weight"] = adapter.b[m][i].contiguous()  # (d_out, r)
    return state


def save_peft(adapter: LoraAdapter, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` as a PEFT directory, atomically (temp dir then rename)."""
    adapter.check_finite()
    with atomic_dir(out_dir) as tmp:
        write_peft_files(adapter, tmp, dtype)
    return Path(out_dir)


def write_peft_files(adapter: LoraAdapter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """The two PEFT files into an existing directory (callers make that directory atomic)."""
    adapter.check_finite()
    save_file(adapter_state_dict(adapter.to("cpu", dtype)), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(adapter_config(adapter), indent=2))
    if adapter.metadata:
        (directory / SIDECAR_NAME).write_text(json.dumps(adapter.metadata, indent=2, ensure_ascii=False))


def _read_config(d: Path) -> dict:
    path = d / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{CONFIG_NAME} is missing from the adapter directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are accepted")
    for key, bad in _UNSUPPORTED.items():
        if cfg.get(key) == bad:
            raise AdapterFormatError(f"{key}={bad} is not supported; only plain LoRA adapters are accepted")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterFormatError(f"{key} is not supported (every module must share r and lora_alpha)")
    if cfg.get("modules_to_save"):
        raise AdapterFormatError("modules_to_save is not supported: an adapter may carry LoRA factors only")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise AdapterFormatError(f"r must be a positive integer, got {cfg.get('r')!r}")
    if not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise AdapterFormatError(f"lora_alpha must be a number, got {cfg.get('lora_alpha')!r}")
    return cfg


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFormatError(f"refusing pickle-based file(s) {pickles}: only {WEIGHTS_NAME} is accepted")
    path = d / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{WEIGHTS_NAME} is missing from the adapter directory")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from e


def load_peft(path: str | Path, spec: ModelSpec | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory; with `spec`, also check that it fits that base model."""
    d = Path(path)
    if not d.is_dir():
        raise AdapterFormatError(f"{d} is not a directory")
    cfg = _read_config(d)
    rank = cfg["r"]
    state = _read_weights(d)
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in state.items():
        if not t.dtype.is_floating_point:
            raise AdapterFormatError(f"{key} is {str(t.dtype).removeprefix('torch.')}; LoRA factors must be "
                                     f"floating point (float32, float16 or bfloat16)")
        m = _KEY.match(key)
        if m is None or m.group(3) not in MODULE_PARENTS or MODULE_PARENTS[m.group(3)] != m.group(2):
            raise AdapterFormatError(f"unknown tensor key {key!r}; expected base_model.model.model.layers.<i>."
                                     f"<self_attn|mlp>.<module>.lora_<A|B>.weight")
        found.setdefault(m.group(3), {}).setdefault(int(m.group(1)), {})[m.group(4)] = t
    if not found:
        raise AdapterFormatError(f"{WEIGHTS_NAME} holds no LoRA tensors")
    n_layers = spec.n_layers if spec else 1 + max(i for mod in found.values() for i in mod)
    a, b = {}, {}
    for module, layers in found.items():
        a[module], b[module] = _stack_module(module, layers, rank, n_layers, spec)
    try:
        adapter = LoraAdapter(
            base_model=str(cfg.get("base_model_name_or_path") or ""), rank=rank,
            alpha=float(cfg.get("lora_alpha", 8)), a=a, b=b, use_rslora=bool(cfg.get("use_rslora", False)),
            metadata=read_sidecar(d),
        )
        adapter.check_finite()
        if spec is not None:
            adapter.check_fits(spec)
    except AdapterFormatError:
        raise
    except ValueError as e:  # NaN/Inf, or factors that do not fit `spec`: still a bad adapter directory
        raise AdapterFormatError(str(e)) from e
    return adapter


def _stack_module(module, layers, rank, n_layers, spec):
    """Stack one module's per-layer factors; layers the adapter skips get zeros (PEFT's layers_to_transform)."""
    if max(layers) >= n_layers:
        raise AdapterFormatError(f"{module}: layer {max(layers)} does not exist (the model has {n_layers})")
    some = next(iter(layers.values()))
    if "A" not in some or "B" not in some:
        raise AdapterFormatError(f"{module}: a layer has lora_A without lora_B or the reverse")
    d_in, d_out = spec.shapes[module] if spec else (some["A"].shape[-1], some["B"].shape[0])
    a = torch.zeros(n_layers, rank, d_in)
    b = torch.zeros(n_layers, d_out, rank)
    for i, ab in layers.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"layer {i} {module}: has lora_{''.join(ab)} only, needs both A and B")
        if tuple(ab["A"].shape) != (rank, d_in) or tuple(ab["B"].shape) != (d_out, rank):
            raise AdapterFormatError(
                f"layer {i} {module}: lora_A is {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}, "
                f"expected ({rank}, {d_in}) and ({d_out}, {rank})"
            )
        a[i], b[i] = ab["A"].float(), ab["B"].float()
    return a, b
