"""The LoRA CVAE's one typed config (shared by the `cvae` and `sg` generators)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from generator.spec import DEFAULT_TARGETS, ModelSpec, check_targets

Size = Literal["default", "large", "tiny"]
# Named widths. For SmolLM2 q+v rank 8 (460,800 adapter params): "default" has 2.5M weights (6.0 MB fp16
# checkpoint with its normaliser, 2.2% of the 146-task library's final adapters), "large" 6.9M (14.8 MB, 5.4%);
# "tiny" is for tests and smoke runs.
SIZES: dict[str, dict[str, int]] = {
    "default": {"z_dim": 64, "cond_dim": 128, "tok_dim": 32, "layer_dim": 64, "hidden_dim": 256, "dec_dim": 512},
    "large": {"z_dim": 128, "cond_dim": 256, "tok_dim": 64, "layer_dim": 128, "hidden_dim": 512, "dec_dim": 576},
    "tiny": {"z_dim": 8, "cond_dim": 16, "tok_dim": 8, "layer_dim": 16, "hidden_dim": 32, "dec_dim": 16},
}


@dataclass
class CVAEConfig:
    """Everything that fixes the CVAE's shapes; saved beside its weights as JSON.

    The adapter is seen as rows: for each (module, A|B) "kind", `(L, r, d)` rows of length d (A's rows,
    B's columns). Encoder: rows -> per-kind projection -> per-layer MLP -> flattened layers + condition
    -> (mu, logvar) of z. Decoder: z + condition -> trunk -> a projection per layer -> a small vector per
    (kind, rank) -> a shared expansion to dec_dim -> a per-kind head back to rows. Parameters are
    normalised (per-element library mean, per-(layer, kind) std) before encoding, de-normalised after decoding.
    """

    spec: ModelSpec  # base model the adapters are for
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # module types that carry a LoRA
    rank: int = 8  # LoRA rank of the library's adapters
    alpha: float = 16.0  # lora_alpha of the library's adapters
    embed_dim: int = 384  # width of the description embedding (all-MiniLM-L6-v2: 384)
    embedder: str = "sentence-transformers/all-MiniLM-L6-v2"  # which embedder the condition comes from
    z_dim: int = 64  # latent width
    cond_dim: int = 128  # width of the projected condition (description [+ examples])
    tok_dim: int = 32  # width of one row's token (encoder: projected row; decoder: before expansion)
    layer_dim: int = 64  # width of one layer's summary (encoder) / context (decoder)
    hidden_dim: int = 256  # width of the encoder and decoder trunks
    dec_dim: int = 512  # decoder: width of a row's expanded token; a kind's rows span at most this many directions
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: training steps, library, losses

    def __post_init__(self) -> None:
        self.target_modules = check_targets(list(self.target_modules))
        for name in ("rank", "embed_dim", "z_dim", "cond_dim", "tok_dim", "layer_dim", "hidden_dim", "dec_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        missing = [m for m in self.target_modules if m not in self.spec.shapes]
        if missing:
            raise ValueError(f"{self.spec.name} has no shape for target module(s) {missing}")

    @property
    def variant(self) -> str:
        """Shown by `hyperlora info`."""
        return f"row-chunk z={self.z_dim}"

    @classmethod
    def sized(cls, size: Size, **fields) -> CVAEConfig:
        if size not in SIZES:
            raise ValueError(f"unknown CVAE size {size!r}; choose from {sorted(SIZES)}")
        return cls(**{**SIZES[size], **fields})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CVAEConfig:
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown CVAE config field(s) {sorted(unknown)}")
        d["spec"] = ModelSpec.from_dict(d["spec"])
        d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)
