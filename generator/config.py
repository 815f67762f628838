"""The generator component's one config, and building what it names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from generator.models import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER, base_model_name, resolve_base_model
from generator.spec import ModelSpec


@dataclass
class GeneratorConfig:
    """Which base model, embedder and generator checkpoint to use, and where to run them."""

    base_model: str = DEFAULT_BASE_MODEL  # embedded default, or a local HF causal-LM directory
    embedder: str = DEFAULT_EMBEDDER  # embedded default, or a local sentence-transformers directory
    generator: str = "t2l"  # registered generator name (see generator.generate.GENERATORS)
    checkpoint: str | None = None  # checkpoint directory; None: the shipped one for the default base model
    device: str = "cpu"  # torch device for the embedder and generator

    def __post_init__(self) -> None:
        from generator.generate import GENERATORS

        if self.generator not in GENERATORS:
            raise ValueError(f"unknown generator {self.generator!r}; choose from {sorted(GENERATORS)}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.checkpoint!r} does not exist")
        import torch  # here, not at the top: the Gateway reads load_spec without torch

        torch.device(self.device)  # raises on a malformed device string


def load_spec(base_model: str = DEFAULT_BASE_MODEL) -> ModelSpec:
    """The base model's spec from its config alone (no weights loaded; config.json as JSON when it holds every
    shape, transformers' AutoConfig otherwise)."""
    path = resolve_base_model(base_model)
    if (spec := ModelSpec.from_config_json(path / "config.json", base_model_name(base_model))) is not None:
        return spec
    from transformers import AutoConfig

    ggufs = sorted(path.glob("*.gguf")) if not (path / "config.json").exists() else []
    extra = {"gguf_file": ggufs[0].name} if ggufs else {}
    return ModelSpec.from_hf_config(AutoConfig.from_pretrained(path, **extra), base_model_name(base_model))


def build_generator(cfg: GeneratorConfig, spec: ModelSpec | None = None):
    """The generator `cfg` names, its encoder loaded; a fresh one (loudly flagged) when no checkpoint exists."""
    from generator.encoder import TaskEncoder
    from generator.generate import GENERATORS, default_checkpoint

    spec = spec or load_spec(cfg.base_model)
    encoder = TaskEncoder.load(cfg.embedder, cfg.device)
    cls = GENERATORS[cfg.generator]
    ckpt = cfg.checkpoint or (default_checkpoint(cfg.generator) if cfg.base_model == DEFAULT_BASE_MODEL else None)
    if ckpt is None:
        return cls.fresh(spec, encoder, cfg.device)
    return cls.from_checkpoint(ckpt, encoder, spec, cfg.device)
