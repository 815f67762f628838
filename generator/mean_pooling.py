"""A sentence-transformers directory of exactly Transformer -> mean Pooling (-> Normalize), loaded without
sentence_transformers (it pulls in scikit-learn and SciPy: seconds of every service replica's start that embeds text,
the Router and the Generator): a plain BERT (the default MiniLM) in torch alone (generator/bert.py, no transformers
modeling code either), anything else with transformers; what `SentenceTransformer(path)` builds for such a model.

`load_mean_pooling(path)` returns None for any other directory (other pooling, prompts, lower-casing, extra modules or
settings); the encoder then loads it with sentence-transformers as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_ST = "sentence_transformers.models."
_POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")  # each must be off; mean_tokens on
_BERT_CONFIG_KEYS = {"max_seq_length", "do_lower_case"}


@dataclass
class MeanPoolingModel:
    """The parts of a `SentenceTransformer` the task encoder uses."""

    auto_model: Any  # the Hugging Face encoder (`AutoModel`), in eval mode
    tokenizer: Any
    max_seq_length: int  # tokens per text; longer texts are truncated
    dim: int  # embedding width

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def mean_pooling_settings(path: Path) -> tuple[int, int] | None:
    """(max_seq_length, dim) when the directory is exactly Transformer -> mean Pooling (-> Normalize) with no
    prompts and no lower-casing; None otherwise."""
    try:
        modules = _read(path / "modules.json")
        bert = _read(path / "sentence_bert_config.json")
        st_cfg = _read(path / "config_sentence_transformers.json") or {}
        types = [m.get("type") for m in modules] if isinstance(modules, list) else []
        if types not in ([f"{_ST}Transformer", f"{_ST}Pooling"], [f"{_ST}Transformer", f"{_ST}Pooling",
                                                                   f"{_ST}Normalize"]):
            return None
        if modules[0].get("path") != "" or not isinstance(bert, dict) or set(bert) - _BERT_CONFIG_KEYS:
            return None
        prompts = any((st_cfg.get("prompts") or {}).values()) or st_cfg.get("default_prompt_name")
        if bert.get("do_lower_case") or prompts:
            return None
        pooling = _read(path / modules[1]["path"] / "config.json")
        mean = pooling.get("pooling_mode") == "mean" or (
            pooling.get("pooling_mode_mean_tokens") is True and not any(pooling.get(k) for k in _POOLING_MODES))
        max_len, dim = bert.get("max_seq_length"), pooling.get("word_embedding_dimension")
        if not mean or not isinstance(max_len, int) or not isinstance(dim, int):
            return None
        return max_len, dim
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError):
        return None


def load_mean_pooling(path: str | Path, device: torch.device | str = "cpu") -> MeanPoolingModel | None:
    """The model at `path`, or None when it is not a plain mean-pooling model: a plain BERT (the default MiniLM) in
    torch alone (generator/bert.py), anything else with transformers."""
    path = Path(path)
    settings = mean_pooling_settings(path)
    if settings is None:
        return None
    max_len, dim = settings
    from generator.bert import load_plain_bert

    plain = load_plain_bert(path, device)
    if plain is not None and int(plain[0].config["hidden_size"]) == dim:
        return MeanPoolingModel(plain[0], plain[1], max_len, dim)
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device).eval()
    if int(model.config.hidden_size) != dim:
        return None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return MeanPoolingModel(model, tokenizer, max_len, dim)
