"""The hypernetwork's one typed config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from generator.spec import DEFAULT_TARGETS, ModelSpec, check_targets

Variant = Literal["L", "M", "S"]


@dataclass
class HypernetConfig:
    """Everything that fixes a Text-to-LoRA hypernetwork's shapes; saved beside its weights as JSON."""

    spec: ModelSpec  # the base model the generated adapters are for
    variant: Variant = "M"  # L: A and B in one head call; M: one head shared by A and B; S: one rank per call
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # module types that get a LoRA
    rank: int = 8  # LoRA rank of generated adapters (base_rank of them fixed, the rest generated)
    alpha: float = 16.0  # lora_alpha of generated adapters
    embed_dim: int = 384  # width of the task-description embedding (all-MiniLM-L6-v2: 384)
    embedder: str = "sentence-transformers/all-MiniLM-L6-v2"  # which embedder the task embedding comes from
    task_dim: int = 64  # width of the encoded task
    pos_dim: int = 32  # width of the layer / module / A-B / rank embeddings
    hidden_dim: int = 512  # width of the MLP backbone
    n_blocks: int = 2  # residual blocks in the backbone
    dropout: float = 0.05  # dropout in the task encoder and backbone
    base_rank: int = 0  # leading ranks of every adapter that are a fixed base adapter stored with the weights
    # (e.g. the multi-task LoRA): the network then generates a task-specific residual of rank `rank - base_rank`
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: training mode, steps, data

    def __post_init__(self) -> None:
        if self.variant not in ("L", "M", "S"):
            raise ValueError(f"variant must be one of 'L', 'M', 'S', got {self.variant!r}")
        self.target_modules = check_targets(list(self.target_modules))
        for name in ("rank", "embed_dim", "task_dim", "pos_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.base_rank < self.rank:
            raise ValueError(f"base_rank must be in [0, rank={self.rank}), got {self.base_rank}")
        if self.n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {self.n_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HypernetConfig:
        d = dict(d)
        d["spec"] = ModelSpec.from_dict(d["spec"])
        d["target_modules"] = tuple(d["target_modules"])
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown hypernetwork config field(s) {sorted(unknown)}")
        return cls(**d)
