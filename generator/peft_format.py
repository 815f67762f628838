"""The PEFT adapter directory's file names, its metadata sidecar and the error for an unreadable one: no torch,
so what only names or sorts adapter files (uploads, the library's records) imports this, not generator/peft_io.py
(which reads and writes the weights, and re-exports all of this)."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "hyperlora.json"
MAX_SIDECAR_BYTES = 64 << 10
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterFormatError(ValueError):
    """A PEFT adapter directory that cannot be read: the message names the problem."""


def read_sidecar(d: Path) -> dict[str, str]:
    """The adapter's metadata from `hyperlora.json`, or {} when there is none. Checked: a small flat object of
    strings (an uploaded adapter may carry one)."""
    path = d / SIDECAR_NAME
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise AdapterFormatError(f"{SIDECAR_NAME} is {path.stat().st_size} bytes; the limit is {MAX_SIDECAR_BYTES}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{SIDECAR_NAME} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise AdapterFormatError(f"{SIDECAR_NAME} must hold a JSON object of strings, e.g. "
                                 '{"instruction": "Classify the sentiment of the review."}')
    return meta
