"""A plain BERT encoder (the default embedder, all-MiniLM-L6-v2) in torch alone, with its `tokenizer.json` read by
`tokenizers`: what `transformers.AutoModel` and `AutoTokenizer` give for such a directory, without importing
transformers' modeling code (about 2.5 s of CPU in each service replica that embeds text, the Router and the
Generator, at every start). Eval-mode forward only (no dropout); `last_hidden_state` is what mean pooling reads.

`load_plain_bert(path)` returns None for anything it does not cover exactly (another architecture, activation or
position embedding, no `tokenizer.json`); generator/mean_pooling.py then loads the directory with transformers.
tests/test_encoder.py checks tokens and embeddings against transformers on the real model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_SUPPORTED = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # (batch, seq, hidden)


class Encoded(dict):
    """`input_ids`, `token_type_ids` and `attention_mask`, each `(batch, seq)` int64 (or lists without tensors)."""

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded({k: v.to(device) for k, v in self.items()})


class PlainTokenizer:
    """The part of a Hugging Face fast tokenizer's call the encoder uses, on the same `tokenizer.json`."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_padding()  # tokenizer.json may carry fixed padding and truncation; the caller decides
        self.tok.no_truncation()
        self.pad_id = self.tok.token_to_id("[PAD]") or 0

    def __call__(self, texts: list[str], padding: bool = False, truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True, return_tensors: str | None = None) -> Encoded:
        if truncation and max_length:
            self.tok.enable_truncation(max_length)
        try:
            encs = self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            self.tok.no_truncation()
        ids = [e.ids for e in encs]
        if not padding:
            return Encoded(input_ids=ids, attention_mask=[[1] * len(i) for i in ids])
        width = max(len(i) for i in ids)
        out = Encoded(input_ids=[i + [self.pad_id] * (width - len(i)) for i in ids],
                      token_type_ids=[[0] * width for _ in ids],
                      attention_mask=[[1] * len(i) + [0] * (width - len(i)) for i in ids])
        return Encoded({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}) if return_tensors else out


class PlainBert(torch.nn.Module):
    """BERT's embeddings and encoder layers; weights named as in a Hugging Face `BertModel` checkpoint."""

    def __init__(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        self.heads, self.eps = int(config["num_attention_heads"]), float(config["layer_norm_eps"])
        self.n_layers = int(config["num_hidden_layers"])
        self.w = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v, requires_grad=False)
                                         for k, v in state.items() if not k.startswith("pooler.")
                                         and not k.endswith("position_ids")})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _p(self, name: str) -> torch.Tensor:
        return self.w[name.replace(".", "__")]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self._p(f"{name}.weight"), self._p(f"{name}.bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self._p(f"{name}.weight"), self._p(f"{name}.bias"), self.eps)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> BertOutput:
        seq = input_ids.shape[1]
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = (F.embedding(input_ids, self._p("embeddings.word_embeddings.weight"))
             + self._p("embeddings.position_embeddings.weight")[:seq]
             + F.embedding(types, self._p("embeddings.token_type_embeddings.weight")))  # (batch, seq, hidden)
        x = self._norm(x, "embeddings.LayerNorm")
        keep = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, seq): keys a query may attend to
        for i in range(self.n_layers):
            x = self._layer(x, keep, f"encoder.layer.{i}")
        return BertOutput(x)

    def _layer(self, x: torch.Tensor, keep: torch.Tensor, p: str) -> torch.Tensor:
        b, s, h = x.shape
        split = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731 - (b, heads, s, d)
        q, k, v = (split(self._linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0 / math.sqrt(h // self.heads))
        att = att.transpose(1, 2).reshape(b, s, h)
        x = self._norm(x + self._linear(att, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        mid = F.gelu(self._linear(x, f"{p}.intermediate.dense"))  # exact (erf) GELU, as BERT's "gelu"
        return self._norm(x + self._linear(mid, f"{p}.output.dense"), f"{p}.output.LayerNorm")


def load_plain_bert(path: str | Path, device: torch.device | str = "cpu") -> tuple[PlainBert, PlainTokenizer] | None:
    """(model, tokenizer) for a BERT directory this module covers exactly, in float32 on `device`; None otherwise."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if any(config.get(k, v if k == "position_embedding_type" else None) != v for k, v in _SUPPORTED.items()) \
            or not (path / "tokenizer.json").is_file() or not (path / "model.safetensors").is_file():
        return None
    from safetensors.torch import load_file

    state = {k.removeprefix("bert."): v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    needed = [f"encoder.layer.{config['num_hidden_layers'] - 1}.output.LayerNorm.bias",
              "embeddings.word_embeddings.weight"]
    if any(k not in state for k in needed):
        return None
    return PlainBert(config, state).to(device).eval(), PlainTokenizer(path / "tokenizer.json")
