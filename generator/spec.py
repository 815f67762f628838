"""Base-model specs: which linear modules a LoRA can target and their shapes.

Every Llama-family decoder (Llama, Mistral, Qwen2, Gemma, SmolLM2) names its projections the same way
(`model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.up_proj`, ...), so shapes follow from the
HF config alone: no weights need to be loaded to plan an adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# module type -> the sub-module of a decoder layer that holds it
MODULE_PARENTS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
# config.json fields the shapes come from; read as JSON only when all are there (no model-class defaults)
_SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers")
_HEAD_DIM_FROM_HIDDEN = ("llama", "mistral", "qwen2")  # model types whose missing head_dim is hidden_size // heads


def check_targets(targets: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate a list of target module types and return it in canonical order."""
    if not targets:
        raise ValueError(f"target_modules is empty; choose from {list(MODULE_PARENTS)}")
    unknown = [t for t in targets if t not in MODULE_PARENTS]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown}; allowed: {list(MODULE_PARENTS)}")
    return tuple(m for m in MODULE_PARENTS if m in targets)


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder's LoRA-targetable linears."""

    name: str  # base model id as written into adapter_config.json (base_model_name_or_path)
    n_layers: int  # number of decoder layers
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # module type -> (d_in, d_out)

    @classmethod
    def from_hf_config(cls, config: Any, name: str) -> ModelSpec:
        hidden = config.hidden_size
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        inter = config.intermediate_size
        shapes = {
            "q_proj": (hidden, n_heads * head_dim),
            "k_proj": (hidden, n_kv * head_dim),
            "v_proj": (hidden, n_kv * head_dim),
            "o_proj": (n_heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(name=name, n_layers=config.num_hidden_layers, shapes=shapes)

    @classmethod
    def from_config_json(cls, path: Path, name: str) -> ModelSpec | None:
        """The spec from a HF `config.json` read as plain JSON (no transformers import: a second or two of a
        service replica's start), or None when the file leaves a shape to a model class's defaults: then
        `from_hf_config(AutoConfig...)` is the reference."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict) or any(not isinstance(raw.get(k), int) or isinstance(raw.get(k), bool)
                                            for k in _SHAPE_FIELDS):
            return None
        if not isinstance(raw.get("head_dim"), int) and raw.get("model_type") not in _HEAD_DIM_FROM_HIDDEN:
            return None  # e.g. Gemma's head_dim defaults to 256, not hidden_size // heads
        return cls.from_hf_config(SimpleNamespace(**{k: raw.get(k) for k in (*_SHAPE_FIELDS, "head_dim")}), name)

    def module_path(self, layer: int, module: str) -> str:
        """Dotted name of one target inside a `*ForCausalLM` model."""
        return f"model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"

    def target_shapes(self, targets: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
        return {m: self.shapes[m] for m in check_targets(targets)}

    def lora_params(self, targets: tuple[str, ...] | list[str], rank: int) -> int:
        """Number of LoRA parameters of a rank-`rank` adapter on `targets`."""
        return sum(self.n_layers * rank * (i + o) for i, o in self.target_shapes(targets).values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_layers": self.n_layers, "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(name=d["name"], n_layers=int(d["n_layers"]), shapes={k: tuple(v) for k, v in d["shapes"].items()})

    def mismatch(self, other: ModelSpec, targets: tuple[str, ...] | list[str]) -> str | None:
        """Describe why adapters for `other` do not fit this model, or None when they do."""
        if self.n_layers != other.n_layers:
            return f"{other.name} has {other.n_layers} layers, {self.name} has {self.n_layers}"
        for m in targets:
            if self.shapes.get(m) != other.shapes.get(m):
                return (f"{m} is {other.shapes.get(m)} (d_in, d_out) in {other.name} "
                        f"but {self.shapes.get(m)} in {self.name}")
        return None
