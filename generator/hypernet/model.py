"""Text-to-LoRA hypernetworks: task embedding -> LoRA A and B for every (layer, module) in one pass.

Shared trunk: a task encoder, learned layer-index and module-type embeddings, and a residual MLP. The
three sizes differ in what one head call emits (the paper's L / M / S):
  L: A and B of one (layer, module) together;
  M: A or B, the head shared by both and told which by an A/B embedding;
  S: one rank-one slice (a row of A or a column of B), told which by A/B and rank embeddings.
Every call is batched over descriptions: N embeddings -> N adapters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from generator.hypernet.config import HypernetConfig

HYPERNETS: dict[str, type[Hypernet]] = {}
_B_GAIN = 0.01  # generated B starts small (a fresh adapter nudges the model; LoRA's B=0 init, softened)


def register(variant: str):
    def deco(cls: type[Hypernet]) -> type[Hypernet]:
        HYPERNETS[variant] = cls
        cls.variant = variant
        return cls

    return deco


def build_hypernet(cfg: HypernetConfig) -> Hypernet:
    if cfg.variant not in HYPERNETS:
        raise ValueError(f"unknown hypernetwork variant {cfg.variant!r}; registered: {sorted(HYPERNETS)}")
    return HYPERNETS[cfg.variant](cfg)


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(nn.functional.silu(self.fc1(self.norm(x)))))


class Hypernet(nn.Module):
    """Shared trunk; subclasses add their extra embeddings and heads."""

    variant = ""
    n_extra_pos = 0  # embeddings beyond layer and module that a head call is conditioned on

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.shapes = cfg.spec.target_shapes(cfg.target_modules)  # module -> (d_in, d_out)
        self.task_encoder = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.task_dim), nn.LayerNorm(cfg.task_dim), nn.SiLU(), nn.Dropout(cfg.dropout)
        )
        self.layer_emb = nn.Embedding(cfg.spec.n_layers, cfg.pos_dim)
        self.module_emb = nn.Embedding(len(self.shapes), cfg.pos_dim)
        in_dim = cfg.task_dim + (2 + self.n_extra_pos) * cfg.pos_dim
        self.trunk = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim),
            *[ResidualBlock(cfg.hidden_dim, cfg.dropout) for _ in range(cfg.n_blocks)],
            nn.LayerNorm(cfg.hidden_dim),
        )

    def _context(self, task_emb: torch.Tensor) -> torch.Tensor:
        """`(N, embed_dim)` -> `(N, L, M, task_dim + 2*pos_dim)`: encoded task beside layer and module embeddings."""
        n, n_layers, n_mod = task_emb.shape[0], self.cfg.spec.n_layers, len(self.shapes)
        task = self.task_encoder(task_emb)[:, None, None, :].expand(n, n_layers, n_mod, -1)
        layer = self.layer_emb.weight[None, :, None, :].expand(n, n_layers, n_mod, -1)
        module = self.module_emb.weight[None, None, :, :].expand(n, n_layers, n_mod, -1)
        return torch.cat([task, layer, module], dim=-1)

    @staticmethod
    def _with(ctx: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Append one more embedding axis: ctx `(..., C)` x emb `(K, P)` -> `(..., K, C + P)`."""
        k = emb.shape[0]
        ctx = ctx.unsqueeze(-2).expand(*ctx.shape[:-1], k, ctx.shape[-1])
        return torch.cat([ctx, emb.expand(*ctx.shape[:-1], emb.shape[-1])], dim=-1)

    def forward(self, task_emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`(N, embed_dim)` -> A `{m: (N, L, r, d_in)}` and B `{m: (N, L, d_out, r)}`."""
        if task_emb.dim() != 2 or task_emb.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"task embeddings must be (N, {self.cfg.embed_dim}), got {tuple(task_emb.shape)}")
        return self._heads(self._context(task_emb))

    def _heads(self, ctx: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _init_head(self, head: nn.Linear, rows_a: int, d_a: int) -> None:
        """Scale a head so generated A starts near Kaiming scale for d_a and B near _B_GAIN times that."""
        nn.init.normal_(head.weight, std=1.0 / math.sqrt(self.cfg.hidden_dim * d_a))
        nn.init.zeros_(head.bias)
        if rows_a < head.weight.shape[0]:
            head.weight.data[rows_a:] *= _B_GAIN


@register("L")
class HypernetL(Hypernet):
    """One head call per (layer, module) emits A and B together."""

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__(cfg)
        r = cfg.rank
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.hidden_dim, r * (i + o)) for m, (i, o) in self.shapes.items()})
        for m, (d_in, _) in self.shapes.items():
            self._init_head(self.heads[m], r * d_in, d_in)

    def _heads(self, ctx):
        h = self.trunk(ctx)  # (N, L, M, H)
        n, n_layers, r = h.shape[0], h.shape[1], self.cfg.rank
        a, b = {}, {}
        for j, (m, (d_in, d_out)) in enumerate(self.shapes.items()):
            out = self.heads[m](h[:, :, j])  # (N, L, r*(d_in+d_out))
            a[m] = out[..., : r * d_in].reshape(n, n_layers, r, d_in)
            b[m] = out[..., r * d_in:].reshape(n, n_layers, r, d_out).transpose(-1, -2)
        return a, b


@register("M")
class HypernetM(Hypernet):
    """One head per module shared by A and B (output width r * max(d_in, d_out)), told apart by an A/B embedding."""

    n_extra_pos = 1

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__(cfg)
        r = cfg.rank
        self.ab_emb = nn.Embedding(2, cfg.pos_dim)
        self.gain = nn.Parameter(torch.tensor([1.0, _B_GAIN]))  # output scale of A and of B
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.hidden_dim, r * max(i, o)) for m, (i, o) in self.shapes.items()})
        for m, (d_in, _) in self.shapes.items():
            self._init_head(self.heads[m], self.heads[m].weight.shape[0], d_in)

    def _heads(self, ctx):
        h = self.trunk(self._with(ctx, self.ab_emb.weight))  # (N, L, M, 2, H)
        n, n_layers, r = h.shape[0], h.shape[1], self.cfg.rank
        a, b = {}, {}
        for j, (m, (d_in, d_out)) in enumerate(self.shapes.items()):
            out = self.heads[m](h[:, :, j])  # (N, L, 2, r*max(d_in, d_out))
            a[m] = self.gain[0] * out[:, :, 0, : r * d_in].reshape(n, n_layers, r, d_in)
            b[m] = self.gain[1] * out[:, :, 1, : r * d_out].reshape(n, n_layers, r, d_out).transpose(-1, -2)
        return a, b


@register("S")
class HypernetS(Hypernet):
    """One head call per rank-one slice: A/B and rank embeddings pick which row of A or column of B."""

    n_extra_pos = 2

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__(cfg)
        self.ab_emb = nn.Embedding(2, cfg.pos_dim)
        self.rank_emb = nn.Embedding(cfg.rank, cfg.pos_dim)
        self.gain = nn.Parameter(torch.tensor([1.0, _B_GAIN]))
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.hidden_dim, max(i, o)) for m, (i, o) in self.shapes.items()})
        for m, (d_in, _) in self.shapes.items():
            self._init_head(self.heads[m], self.heads[m].weight.shape[0], d_in)

    def _heads(self, ctx):
        ctx = self._with(self._with(ctx, self.ab_emb.weight), self.rank_emb.weight)  # (N, L, M, 2, r, C)
        h = self.trunk(ctx)  # (N, L, M, 2, r, H)
        a, b = {}, {}
        for j, (m, (d_in, d_out)) in enumerate(self.shapes.items()):
            out = self.heads[m](h[:, :, j])  # (N, L, 2, r, max(d_in, d_out))
            a[m] = self.gain[0] * out[:, :, 0, :, :d_in]  # (N, L, r, d_in)
            b[m] = self.gain[1] * out[:, :, 1, :, :d_out].transpose(-1, -2)  # (N, L, d_out, r)
        return a, b
