"""The task encoder: sentences -> unit-norm embeddings with a sentence-transformers model."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import torch

from generator.mean_pooling import MeanPoolingModel, load_mean_pooling
from generator.models import DEFAULT_EMBEDDER, load_embedder, resolve_embedder

logger = logging.getLogger(__name__)


def check_texts(texts: Sequence[str], what: str = "description") -> list[str]:
    """Refuse an empty batch and empty or whitespace-only strings, naming the offender."""
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError(f"no {what} given: pass at least one non-empty {what}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{what} #{i} is {type(t).__name__}, expected a string")
        if not t.strip():
            raise ValueError(f"{what} #{i} is empty or whitespace: give a sentence that says what the task is")
    return [t.strip() for t in texts]


class TaskEncoder:
    """Embeds task descriptions (or inputs) into the vectors a hypernetwork or retriever is conditioned on."""

    def __init__(self, model, name: str = DEFAULT_EMBEDDER) -> None:
        self.model = model  # a SentenceTransformer, or a MeanPoolingModel (generator/mean_pooling.py)
        self.name = name
        # the HF model behind a Transformer -> mean Pooling stack
        self._plain = model.auto_model if isinstance(model, MeanPoolingModel) else _plain_mean_pooling(model)

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_EMBEDDER, device: torch.device | str = "cpu") -> TaskEncoder:
        """A plain mean-pooling model (the default MiniLM) with transformers alone; anything else with
        sentence-transformers."""
        t0 = time.perf_counter()
        light = load_mean_pooling(resolve_embedder(name_or_path), device)
        if light is None:
            return cls(load_embedder(name_or_path, device), name_or_path)
        logger.info("loaded embedder %s (mean pooling) in %.2f s", name_or_path, time.perf_counter() - t0)
        return cls(light, name_or_path)

    @property
    def dim(self) -> int:
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def _warn_truncated(self, texts: list[str]) -> None:
        lengths = [len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > self.max_tokens]
        if over:
            msg = (f"{len(over)} text(s) exceed the embedder's {self.max_tokens}-token window and were truncated "
                   f"(#{over[:5]}, longest {max(lengths)} tokens)")
            warnings.warn(msg, UserWarning, stacklevel=3)
            logger.warning(msg)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], what: str = "description", batch_size: int = 64) -> torch.Tensor:
        """`texts` -> `(N, dim)` float32, L2-normalised."""
        texts = check_texts(texts, what)
        self._warn_truncated(texts)
        t0 = time.perf_counter()
        if self._plain is not None:
            emb = torch.cat([self._mean_pool(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)])
        else:
            emb = self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                                    show_progress_bar=False)
        logger.debug("embedded %d %s(s) in %.1f ms", len(texts), what, 1e3 * (time.perf_counter() - t0))
        return emb.float()

    def _mean_pool(self, texts: list[str]) -> torch.Tensor:
        """What `SentenceTransformer.encode` computes for a Transformer + mean Pooling (+ Normalize) model, without
        its per-call overhead (about 9 of 30 ms for one sentence on two CPU cores)."""
        hf = self._plain
        feats = self.model.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt").to(hf.device)
        hidden = hf(**feats).last_hidden_state
        mask = feats["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean.float(), dim=-1)


def _plain_mean_pooling(model):
    """The Hugging Face model inside a sentence-transformers stack of exactly Transformer, mean Pooling and
    optionally Normalize, with no prompts or lower-casing; None for anything else (then `encode` is used)."""
    mods = list(model) if hasattr(model, "__iter__") else []
    kinds = [type(m).__name__ for m in mods]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        return None
    pooling = getattr(mods[1], "get_config_dict", dict)()
    if pooling.get("pooling_mode", "mean" if pooling.get("pooling_mode_mean_tokens") else None) != "mean":
        return None
    if getattr(mods[0], "do_lower_case", False) or any(getattr(model, "prompts", {}).values()) \
            or getattr(model, "default_prompt_name", None):
        return None
    return getattr(mods[0], "auto_model", None)
