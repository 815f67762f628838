"""Loading the frozen base model for a training or evaluation job."""

from __future__ import annotations

import torch

from generator.apply import LoraInjector
from generator.models import base_model_name, load_base_model
from generator.spec import ModelSpec
from training.config import TrainConfig


def load_frozen(cfg: TrainConfig, targets) -> tuple:
    """(model, tokenizer, spec, injector): the base model frozen, in eval mode, with `targets` wrapped."""
    dtype = getattr(torch, cfg.dtype)
    model, tok = load_base_model(cfg.base_model, cfg.device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    spec = ModelSpec.from_hf_config(model.config, base_model_name(cfg.base_model))
    return model, tok, spec, LoraInjector(model, spec, targets)
