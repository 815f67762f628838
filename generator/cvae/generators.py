"""The `cvae` (ICM-LoRA) and `sg` (SG-LoRA) generators: decode a latent drawn from a prior, given the condition.

Both decode with the same CVAE; they differ in the latent prior at generation time:
  cvae: the standard normal N(0, I) (prior mean: z = 0);
  sg:   the semantic prior, a moment-matched mixture of the top-k library experts' latent Gaussians chosen
        by cosine similarity of description embeddings (see generator.cvae.prior), zero-shot.
`mode="mean"` decodes the prior mean (deterministic); `mode="sample"` decodes mean + std * eps with eps drawn
from `seed` alone, so an adapter is a function of (description, examples, seed), whatever else is in the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from generator.cvae.checkpoint import load_cvae, load_experts
from generator.cvae.config import CVAEConfig
from generator.cvae.model import LoraCVAE
from generator.cvae.prior import ExpertBank
from generator.encoder import TaskEncoder
from generator.generate import AdapterGenerator, register_generator
from generator.lora import LoraAdapter
from generator.spec import ModelSpec

logger = logging.getLogger(__name__)
GenerationMode = Literal["mean", "sample"]
Factors = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


class LatentGenerator(AdapterGenerator):
    """Shared by `cvae` and `sg`: the prior gives (mean, var) of z; the decoder turns z + condition into factors."""

    def __init__(self, net: LoraCVAE, encoder: TaskEncoder | None, mode: GenerationMode = "mean", seed: int = 0,
                 trained: bool = True) -> None:
        super().__init__(encoder, net.cfg.spec)  # encoder None: only `factors` on precomputed embeddings works
        if encoder is not None and encoder.dim != net.cfg.embed_dim:
            raise ValueError(f"the CVAE expects {net.cfg.embed_dim}-d embeddings ({net.cfg.embedder}) but the "
                             f"encoder {encoder.name} gives {encoder.dim}-d ones")
        if mode not in ("mean", "sample"):
            raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
        self.net = net.eval()
        self.mode: GenerationMode = mode
        self.seed = seed
        self.trained = trained

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prior(self, task_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(N, D)` description embeddings -> latent prior mean and variance `(N, Z)`."""
        raise NotImplementedError

    def _latent(self, task_emb: torch.Tensor, mode: GenerationMode, seed: int) -> torch.Tensor:
        mu, var = self.prior(task_emb)  # (N, Z) each
        if mode == "mean":
            return mu
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(mu.shape[1], generator=g).to(mu.device)  # (Z,) the same draw for every row
        return mu + var.sqrt() * eps

    def factors(self, task_emb: torch.Tensor, example_emb: torch.Tensor | None = None,
                mode: GenerationMode | None = None, seed: int | None = None) -> Factors:
        """`(N, D)` [+ `(N, D)` example embeddings, zero rows where none] -> A `{m: (N, L, r, d_in)}`,
        B `{m: (N, L, d_out, r)}`."""
        emb = task_emb.to(self.device)
        ex = None if example_emb is None else example_emb.to(self.device)
        z = self._latent(emb, mode or self.mode, self.seed if seed is None else seed)
        return self.net.decode_factors(z, self.net.condition(emb, ex))

    def _example_embeddings(self, examples: Sequence[Sequence[str]], n: int) -> torch.Tensor | None:
        if len(examples) != n:
            raise ValueError(f"{len(examples)} example lists for {n} descriptions")
        if not any(examples):
            return None
        out = torch.zeros(n, self.net.cfg.embed_dim)
        for i, ex in enumerate(examples):
            if ex:
                out[i] = self.encoder.encode(list(ex), what="example").mean(0).cpu()  # (D,)
        return out

    @torch.no_grad()
    def generate_adapters(self, descriptions: Sequence[str], examples: Sequence[Sequence[str]] | None = None,
                          mode: GenerationMode | None = None, seed: int | None = None) -> list[LoraAdapter]:
        """`generate` with the in-context condition (a few example texts per description, may be empty),
        and a per-call mode / seed."""
        t0 = time.perf_counter()
        if isinstance(descriptions, str):
            descriptions = [descriptions]
        emb = self.encoder.encode(descriptions)  # (N, D)
        ex = None if examples is None else self._example_embeddings(examples, len(descriptions))
        a, b = self.factors(emb, ex, mode, seed)
        out = self._adapters(descriptions, a, b)
        logger.info("generated %d adapter(s) with %s in %.1f ms", len(out), self.name, 1e3 * (time.perf_counter() - t0))
        return out

    @torch.no_grad()
    def reconstruct(self, adapters: Sequence[LoraAdapter], descriptions: Sequence[str]) -> list[LoraAdapter]:
        """Encode real adapters with their descriptions and decode the posterior mean (an autoencoder check)."""
        emb = self.encoder.encode(descriptions).to(self.device)
        a = {m: torch.stack([x.a[m] for x in adapters]).to(self.device) for m in self.net.cfg.target_modules}
        b = {m: torch.stack([x.b[m] for x in adapters]).to(self.device) for m in self.net.cfg.target_modules}
        cond = self.net.condition(emb)
        mu, _ = self.net.encode_factors(a, b, cond)
        return self._adapters(descriptions, *self.net.decode_factors(mu, cond))

    @classmethod
    def _fresh_net(cls, spec: ModelSpec, encoder: TaskEncoder, device, **cfg_fields) -> LoraCVAE:
        torch.manual_seed(0)
        cfg = CVAEConfig.sized(cfg_fields.pop("size", "default"), spec=spec, embed_dim=encoder.dim,
                               embedder=encoder.name, **cfg_fields)
        net = LoraCVAE(cfg)
        net.init_untrained_normaliser()
        return net.to(device)


@register_generator("cvae")
class CVAEGenerator(LatentGenerator):
    """ICM-LoRA: z from the standard normal prior, decoded with the description (+ examples) condition."""

    def prior(self, task_emb):
        z = torch.zeros(task_emb.shape[0], self.net.cfg.z_dim, device=task_emb.device)  # (N, Z)
        return z, torch.ones_like(z)

    @classmethod
    def from_checkpoint(cls, path: str | Path, encoder: TaskEncoder | None, spec: ModelSpec | None = None,
                        device: torch.device | str = "cpu", mode: GenerationMode = "mean",
                        seed: int = 0) -> CVAEGenerator:
        """Reads a `cvae` checkpoint, or the CVAE of an `sg` one (then with the standard prior)."""
        return cls(load_cvae(path, spec, device), encoder, mode, seed)

    @classmethod
    def fresh(cls, spec: ModelSpec, encoder: TaskEncoder, device: torch.device | str = "cpu",
              **cfg_fields) -> CVAEGenerator:
        return cls(cls._fresh_net(spec, encoder, device, **cfg_fields), encoder, trained=False)


@register_generator("sg")
class SGGenerator(LatentGenerator):
    """SG-LoRA: z from the semantic prior of the description's nearest library experts (zero-shot)."""

    def __init__(self, net: LoraCVAE, encoder: TaskEncoder | None, experts: ExpertBank | None,
                 mode: GenerationMode = "mean", seed: int = 0, trained: bool = True) -> None:
        super().__init__(net, encoder, mode, seed, trained)
        if experts is not None and (experts.emb.shape[1], experts.mean.shape[1]) != (net.cfg.embed_dim, net.cfg.z_dim):
            raise ValueError(f"expert bank is ({experts.emb.shape[1]}-d embeddings, {experts.mean.shape[1]}-d latents)"
                             f" but the CVAE is ({net.cfg.embed_dim}, {net.cfg.z_dim})")
        self.experts = None if experts is None else experts.to(self.device)

    def prior(self, task_emb):
        if self.experts is None:  # an untrained generator has no library: fall back to the standard normal
            z = torch.zeros(task_emb.shape[0], self.net.cfg.z_dim, device=task_emb.device)
            return z, torch.ones_like(z)
        p = self.experts.prior(task_emb)
        return p.mean, p.var

    @torch.no_grad()
    def neighbours(self, descriptions: Sequence[str]) -> list[list[tuple[str, float]]]:
        """The experts (task, weight) each description's prior mixes, heaviest first."""
        if self.experts is None:
            return [[] for _ in descriptions]
        p = self.experts.prior(self.encoder.encode(descriptions).to(self.device))
        return [[(self.experts.tasks[j], float(w)) for j, w in zip(idx.tolist(), ws.tolist(), strict=True)]
                for idx, ws in zip(p.index, p.weights, strict=True)]

    @classmethod
    def from_checkpoint(cls, path: str | Path, encoder: TaskEncoder | None, spec: ModelSpec | None = None,
                        device: torch.device | str = "cpu", mode: GenerationMode = "mean", seed: int = 0,
                        top_k: int | None = None, temperature: float | None = None) -> SGGenerator:
        experts = load_experts(path, device)
        if top_k is not None or temperature is not None:
            experts = ExpertBank(experts.tasks, experts.emb, experts.mean, experts.var,
                                 top_k or experts.top_k, temperature or experts.temperature)
        return cls(load_cvae(path, spec, device), encoder, experts, mode, seed)

    @classmethod
    def fresh(cls, spec: ModelSpec, encoder: TaskEncoder, device: torch.device | str = "cpu",
              **cfg_fields) -> SGGenerator:
        return cls(cls._fresh_net(spec, encoder, device, **cfg_fields), encoder, None, trained=False)
