"""Running a base model with a different LoRA, or weighted mix of LoRAs, for each sample of a batch.

The target linears are wrapped once (`inject`) and no adapter is ever copied into the model. Each call
sets per-sample factors gathered from a bank of adapters with a mapping of indices and weights
(LoraRetriever's mapping matrix; Punica's BGMV in plain torch): a mixture of K rank-r adapters is one
rank-K*r adapter whose B columns carry the weights, so every sample costs two batched matmuls a module.
The factors may carry gradients: training the LoRA library and the hypernetwork uses the same path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from generator.lora import LoraAdapter
from generator.spec import ModelSpec, check_targets


class MultiLoraLinear(nn.Module):
    """A frozen linear plus an optional per-sample low-rank update."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_a: torch.Tensor | None = None  # (batch, R, d_in)
        self.lora_b: torch.Tensor | None = None  # (batch, d_out, R), scaling and mixture weights folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, d_in)
        y = self.base(x)
        if self.lora_a is None:
            return y
        h = torch.bmm(x.to(self.lora_a.dtype), self.lora_a.transpose(1, 2))  # (batch, seq, R)
        return y + torch.bmm(h, self.lora_b.transpose(1, 2)).to(y.dtype)  # (batch, seq, d_out)


@dataclass
class PerSampleLora:
    """Per-sample factors for every target: a[m] `(n_layers, batch, R, d_in)`, b[m] `(n_layers, batch, d_out, R)`."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return next(iter(self.a.values())).shape[1]


class AdapterBank:
    """Adapters stacked for gathering: a[m] `(n, n_layers, R, d_in)`, b[m] `(n, n_layers, d_out, R)`, scaling folded in.

    Ranks are zero-padded to the largest; targets an adapter lacks are zero.
    """

    def __init__(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
        self.a, self.b = a, b

    @classmethod
    def from_adapters(cls, adapters: Sequence[LoraAdapter], spec: ModelSpec,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> AdapterBank:
        if not adapters:
            raise ValueError("an adapter bank needs at least one adapter")
        targets = check_targets(sorted({m for ad in adapters for m in ad.target_modules}))
        rank = max(ad.rank for ad in adapters)
        a, b = {}, {}
        for m in targets:
            d_in, d_out = spec.shapes[m]
            a[m] = torch.zeros(len(adapters), spec.n_layers, rank, d_in, device=device, dtype=dtype)
            b[m] = torch.zeros(len(adapters), spec.n_layers, d_out, rank, device=device, dtype=dtype)
            for i, ad in enumerate(adapters):
                if m in ad.a:
                    ad.check_fits(spec)
                    a[m][i, :, : ad.rank] = ad.a[m].to(device, dtype)
                    b[m][i, :, :, : ad.rank] = (ad.b[m] * ad.scaling).to(device, dtype)
        return cls(a, b)

    @classmethod
    def from_factors(cls, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scaling: float) -> AdapterBank:
        """From stacked factors, e.g. a hypernetwork's output: a[m] `(n, L, r, d_in)`, b[m] `(n, L, d_out, r)`."""
        return cls(a, {m: t * scaling for m, t in b.items()})

    def __len__(self) -> int:
        return next(iter(self.a.values())).shape[0]

    def gather(self, index: torch.Tensor, weights: torch.Tensor | None = None) -> PerSampleLora:
        """index, weights: `(batch, K)` -> each sample's mixture of its K adapters (weights default to 1/K)."""
        if index.dim() == 1:
            index = index[:, None]
        if weights is not None and weights.dim() == 1:
            weights = weights[:, None]
        if weights is None:
            weights = torch.full(index.shape, 1.0 / index.shape[1])
        index = index.to(next(iter(self.a.values())).device)
        bsz, k = index.shape
        a, b = {}, {}
        for m in self.a:
            w = weights.to(self.b[m])[:, :, None, None, None]  # (batch, K, 1, 1, 1)
            ga = self.a[m][index]  # (batch, K, L, R, d_in)
            gb = self.b[m][index] * w  # (batch, K, L, d_out, R)
            n_layers, rank, d_in = ga.shape[2:]
            a[m] = ga.permute(2, 0, 1, 3, 4).reshape(n_layers, bsz, k * rank, d_in)
            gb = gb.permute(2, 0, 3, 1, 4)  # (L, batch, d_out, K, R)
            b[m] = gb.reshape(n_layers, bsz, gb.shape[2], k * rank)
        return PerSampleLora(a, b)


class LoraInjector:
    """Wraps a model's target linears once; `with injector.use(per_sample): model(...)` applies the factors."""

    def __init__(self, model: nn.Module, spec: ModelSpec, targets: Sequence[str]) -> None:
        self.spec = spec
        self.targets = check_targets(list(targets))
        self.layers: dict[str, list[MultiLoraLinear]] = {m: [] for m in self.targets}
        for m in self.targets:
            for i in range(spec.n_layers):
                parent_name, _, child = spec.module_path(i, m).rpartition(".")
                parent = model.get_submodule(parent_name)
                current = getattr(parent, child)
                if not isinstance(current, MultiLoraLinear):
                    d_in, d_out = spec.shapes[m]
                    if (current.in_features, current.out_features) != (d_in, d_out):
                        raise ValueError(f"{spec.module_path(i, m)} is {current.in_features}->{current.out_features},"
                                         f" spec says {d_in}->{d_out}")
                    current = MultiLoraLinear(current)
                    setattr(parent, child, current)
                self.layers[m].append(current)

    @contextmanager
    def use(self, lora: PerSampleLora | None) -> Iterator[None]:
        if lora is not None:
            missing = set(lora.a) - set(self.targets)
            if missing:
                raise ValueError(f"adapters target {sorted(missing)} but only {list(self.targets)} are injected")
        try:
            self._set(lora)
            yield
        finally:
            self._set(None)

    def _set(self, lora: PerSampleLora | None) -> None:
        for m, layers in self.layers.items():
            for i, layer in enumerate(layers):
                if lora is None or m not in lora.a:
                    layer.lora_a = layer.lora_b = None
                else:
                    layer.lora_a, layer.lora_b = lora.a[m][i], lora.b[m][i]
