"""Composing retrieved adapters (LoraRetriever section 3.3).

`fuse` merges several adapters into one: `average` takes the weighted average of the low-rank factors
(parameter averaging; not the average of the updates, since B and A are averaged separately), `concat`
stacks the ranks, A = [w1*A1; w2*A2], B = [s1*B1, s2*B2], so its update is exactly sum_i w_i * s_i * B_i A_i.

For a routed batch, a registered `Composition` turns each input's `Route` into per-sample factors for
`LoraInjector.use`: `selection` (top-1 adapter), `mixture` (the weighted sum of the adapted outputs, run
through the foundation's per-sample `AdapterBank.gather` with the router's weights) and `fusion`
(each input's adapters fused by parameter averaging).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from generator.apply import AdapterBank, PerSampleLora
from generator.lora import LoraAdapter
from generator.registry import registrar
from generator.spec import ModelSpec, check_targets
from retriever.router import Route

FuseMethod = Literal["average", "concat"]
COMPOSITIONS: dict[str, type[Composition]] = {}


def _check_fusable(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> list[float]:
    if not adapters:
        raise ValueError("fuse needs at least one adapter")
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights: give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    first = adapters[0]
    for i, ad in enumerate(adapters[1:], 1):
        if ad.n_layers != first.n_layers:
            raise ValueError(f"adapter #{i} has {ad.n_layers} layers but adapter #0 has {first.n_layers}")
        for m in set(ad.a) & set(first.a):
            got, want = (ad.a[m].shape[2], ad.b[m].shape[1]), (first.a[m].shape[2], first.b[m].shape[1])
            if got != want:
                raise ValueError(f"adapter #{i}'s {m} is (d_in, d_out)={got} but adapter #0's is {want}")
    return weights


def _shape(adapters: Sequence[LoraAdapter], m: str) -> tuple[int, int]:
    ad = next(a for a in adapters if m in a.a)
    return ad.a[m].shape[2], ad.b[m].shape[1]  # (d_in, d_out)


def _factor(ad: LoraAdapter, m: str, d_in: int, d_out: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A `(L, r, d_in)` and scaled B `(L, d_out, r)` of one module; zeros when the adapter lacks it."""
    if m not in ad.a:
        return like.new_zeros(ad.n_layers, ad.rank, d_in), like.new_zeros(ad.n_layers, d_out, ad.rank)
    return ad.a[m].to(like), (ad.b[m] * ad.scaling).to(like)


def fuse(adapters: Sequence[LoraAdapter], weights: Sequence[float], method: FuseMethod = "concat") -> LoraAdapter:
    """One adapter from several: `concat` is exact (sum of weighted updates), `average` is parameter averaging."""
    weights = _check_fusable(adapters, weights)
    if method not in ("average", "concat"):
        raise ValueError(f"unknown fusion method {method!r}; choose 'average' or 'concat'")
    targets = check_targets(sorted({m for ad in adapters for m in ad.a}))
    like = next(iter(adapters[0].a.values()))
    rank = sum(ad.rank for ad in adapters) if method == "concat" else max(ad.rank for ad in adapters)
    a, b = {}, {}
    for m in targets:
        d_in, d_out = _shape(adapters, m)
        parts = [_factor(ad, m, d_in, d_out, like) for ad in adapters]
        if method == "concat":
            a[m] = torch.cat([w * pa for w, (pa, _) in zip(weights, parts, strict=True)], dim=1)  # (L, sum r, d_in)
            b[m] = torch.cat([pb for _, pb in parts], dim=2)  # (L, d_out, sum r)
        else:
            a[m] = like.new_zeros(like.shape[0], rank, d_in)  # (L, max r, d_in)
            b[m] = like.new_zeros(like.shape[0], d_out, rank)  # (L, d_out, max r)
            for w, (pa, pb) in zip(weights, parts, strict=True):
                a[m][:, : pa.shape[1]] += w * pa
                b[m][:, :, : pb.shape[2]] += w * pb
    names = [ad.metadata.get("id") or ad.metadata.get("name") or "?" for ad in adapters]
    meta = {"fused_from": ",".join(names), "fusion": method, "weights": ",".join(f"{w:.4g}" for w in weights)}
    return LoraAdapter(adapters[0].base_model, rank, float(rank), a, b, use_rslora=False, metadata=meta)


register_composition = registrar(COMPOSITIONS)


class Composition(ABC):
    """Routes of a batch -> per-sample LoRA factors (None: every input runs on the base model)."""

    name = ""

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.spec, self.device, self.dtype = spec, device, dtype

    @abstractmethod
    def per_sample(self, routes: Sequence[Route], load: Callable[[str], LoraAdapter]) -> PerSampleLora | None: ...

    def _gather(self, choices: Sequence[Sequence[tuple[str, float]]], load) -> PerSampleLora | None:
        """choices[i]: (adapter id, weight) pairs of sample i -> a bank of the distinct adapters, gathered."""
        ids = sorted({i for c in choices for i, _ in c})
        if not ids:
            return None
        slot = {i: n for n, i in enumerate(ids)}
        bank = AdapterBank.from_adapters([load(i) for i in ids], self.spec, self.device, self.dtype)
        k = max(len(c) for c in choices)
        index = torch.zeros(len(choices), k, dtype=torch.long)  # (batch, K); padding points at slot 0 ...
        weights = torch.zeros(len(choices), k)  # ... with weight 0
        for row, c in enumerate(choices):
            for col, (i, w) in enumerate(c):
                index[row, col], weights[row, col] = slot[i], w
        return bank.gather(index, weights)


@register_composition("selection")
class Selection(Composition):
    """Each input gets its top-1 adapter."""

    def per_sample(self, routes, load):
        return self._gather([[(r.ids[0], 1.0)] if r.ids else [] for r in routes], load)


@register_composition("mixture")
class Mixture(Composition):
    """Each input's output is the router-weighted sum of its top-k adapters' updates."""

    def per_sample(self, routes, load):
        return self._gather([list(zip(r.ids, r.weights, strict=True)) for r in routes], load)


@register_composition("fusion")
class Fusion(Composition):
    """Each input's top-k adapters are fused by weighted parameter averaging into one adapter."""

    method: FuseMethod = "average"

    def per_sample(self, routes, load):
        if not any(r.ids for r in routes):
            return None
        fused = [fuse([load(i) for i in r.ids], r.weights, self.method) if r.ids else None for r in routes]
        template = next(f for f in fused if f is not None)
        fused = [f if f is not None else _zero_like(template) for f in fused]
        bank = AdapterBank.from_adapters(fused, self.spec, self.device, self.dtype)
        return bank.gather(torch.arange(len(routes))[:, None], torch.ones(len(routes), 1))


def _zero_like(ad: LoraAdapter) -> LoraAdapter:
    return LoraAdapter(ad.base_model, ad.rank, ad.alpha, {m: torch.zeros_like(t) for m, t in ad.a.items()},
                       {m: torch.zeros_like(t) for m, t in ad.b.items()})


def build_composition(name: str, spec: ModelSpec, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> Composition:
    if name not in COMPOSITIONS:
        raise ValueError(f"unknown composition {name!r}; registered: {sorted(COMPOSITIONS)}")
    return COMPOSITIONS[name](spec, device, dtype)
