"""Adapter generators behind one interface, chosen by name: descriptions in, LoRA adapters out.

`t2l` (Text-to-LoRA) lives here; other generators (CVAE, semantic-guided) register beside it.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

from generator.encoder import TaskEncoder, check_texts
from generator.hypernet.checkpoint import load_checkpoint
from generator.hypernet.config import HypernetConfig
from generator.hypernet.model import Hypernet, build_hypernet
from generator.lora import LoraAdapter
from generator.models import SHIPPED_CHECKPOINTS, default_checkpoint  # noqa: F401 - re-exported
from generator.registry import registrar
from generator.spec import ModelSpec

logger = logging.getLogger(__name__)
GENERATORS: dict[str, type[AdapterGenerator]] = {}


register_generator = registrar(GENERATORS)


class AdapterGenerator(ABC):
    """Makes LoRA adapters from task descriptions, many in one call.

    A subclass sets `self.net`, a torch module whose `cfg` has the `rank` and `alpha` of what it makes.
    """

    name = ""
    trained = True  # False for a freshly initialised generator: its adapters carry no task knowledge

    def __init__(self, encoder: TaskEncoder, spec: ModelSpec) -> None:
        self.encoder = encoder
        self.spec = spec

    @abstractmethod
    def factors(self, task_emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`(N, embed_dim)` -> stacked A `{m: (N, L, r, d_in)}` and B `{m: (N, L, d_out, r)}`."""

    @property
    def rank(self) -> int:
        """Rank of the adapters made: every generator's network config carries it."""
        return self.net.cfg.rank

    @property
    def alpha(self) -> float:
        return self.net.cfg.alpha

    @property
    def strength(self) -> float:
        """The strength adapters are made at, their B factors' scale folded into alpha: the one the checkpoint
        chose on held-out train tasks (`strength`, recorded by `training/strength.py --plain`), else 1."""
        return float(self._extra().get("strength", 1.0))

    def _extra(self) -> dict:
        return getattr(self.net.cfg, "extra", None) or {}  # the T2L config has it; the CVAE's need not

    @torch.no_grad()
    def generate(self, descriptions: Sequence[str]) -> list[LoraAdapter]:
        """One adapter per description (a lone string is one description), in one batched pass."""
        t0 = time.perf_counter()
        descriptions = check_texts(descriptions)
        out = self.generate_embedded(self.encoder.encode(descriptions), descriptions)
        logger.info("generated %d adapter(s) with %s in %.1f ms", len(out), self.name, 1e3 * (time.perf_counter() - t0))
        return out

    @torch.no_grad()
    def generate_embedded(self, emb: torch.Tensor, descriptions: Sequence[str]) -> list[LoraAdapter]:
        """One adapter per row of `emb` `(N, embed_dim)`, the descriptions' embeddings made by `self.encoder`
        (a caller that embedded them already, e.g. to search the library, does not embed twice). The adapters
        are on the CPU whatever device made them, like every adapter the library and uploads hold: mixing a
        generated adapter with library ones (retriever/strategy.py) or sending it to another process needs that."""
        if emb.ndim != 2 or emb.shape[0] != len(descriptions):
            raise ValueError(f"{len(descriptions)} descriptions but embeddings of shape {tuple(emb.shape)}")
        return self._adapters(descriptions, *self.factors(emb))

    def _adapters(self, descriptions: Sequence[str], a: dict[str, torch.Tensor],
                  b: dict[str, torch.Tensor]) -> list[LoraAdapter]:
        """One adapter per description from stacked factors `(N, ...)`, on the CPU, at the recorded strength."""
        a, b = ({m: t.detach().float().cpu() for m, t in f.items()} for f in (a, b))  # one copy per module
        alpha = self.alpha * self.strength
        return [LoraAdapter(self.spec.name, self.rank, alpha, {m: t[i] for m, t in a.items()},
                            {m: t[i] for m, t in b.items()}, metadata=self.metadata(d))
                for i, d in enumerate(descriptions)]

    def metadata(self, description: str) -> dict[str, str]:
        """What a generated adapter carries (its `hyperlora.json`): the description, which is also its instruction,
        the strength it was made at (already in its alpha) and, when the checkpoint chose another on held-out
        tasks for prompts that already hold in-context examples (`training/strength.py`), the weight to use it at
        then, relative to the adapter as made."""
        meta = {"description": description, "instruction": description, "generator": self.name}
        strength = self.strength
        if strength != 1.0:
            meta["strength"] = f"{strength:g}"
        with_examples = self._extra().get("strength_with_examples")
        if with_examples is not None and float(with_examples) != strength:
            meta["strength_with_examples"] = f"{float(with_examples) / strength:g}"
        return meta


@register_generator("t2l")
class T2LGenerator(AdapterGenerator):
    """Text-to-LoRA: a hypernetwork maps the description's embedding to every A and B at once."""

    def __init__(self, net: Hypernet, encoder: TaskEncoder | None, trained: bool = True) -> None:
        super().__init__(encoder, net.cfg.spec)
        if encoder is not None and encoder.dim != net.cfg.embed_dim:
            raise ValueError(f"the hypernetwork expects {net.cfg.embed_dim}-d task embeddings ({net.cfg.embedder}) "
                             f"but the encoder {encoder.name} gives {encoder.dim}-d ones")
        self.net = net.eval()
        self.trained = trained

    @classmethod
    def from_checkpoint(cls, path: str | Path, encoder: TaskEncoder | None, spec: ModelSpec | None = None,
                        device: torch.device | str = "cpu") -> T2LGenerator:
        return cls(load_checkpoint(path, spec, device), encoder)

    @classmethod
    def fresh(cls, spec: ModelSpec, encoder: TaskEncoder, device: torch.device | str = "cpu",
              **cfg_fields) -> T2LGenerator:
        cfg = HypernetConfig(spec=spec, embed_dim=encoder.dim, embedder=encoder.name, **cfg_fields)
        with torch.random.fork_rng(devices=[]):  # the same fresh weights every time, global RNG untouched
            torch.manual_seed(0)
            net = build_hypernet(cfg)
        return cls(net.to(device), encoder, trained=False)

    def factors(self, task_emb):
        device = next(self.net.parameters()).device
        return self.net(task_emb.to(device))


# Generators defined in their own modules register on import (after the base class above exists).
from generator.cvae import generators as _latent_generators  # noqa: E402,F401
