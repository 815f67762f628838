"""Text-to-LoRA hypernetworks: task embedding -> LoRA A and B for every (layer, module) in one pass.

Shared trunk: a task encoder, learned layer-index and module-type embeddings, and a residual MLP. The
three sizes differ in what one head call emits (the paper's L / M / S):
  L: A and B of one (layer, module) together;
  M: A or B, the head shared by both and told which by an A/B embedding;
  S: one rank-one slice (a row of A or a column of B), told which by A/B and rank embeddings that
     modulate the trunk's output (so the trunk runs once per (layer, module), not once per slice).
Every call is batched over descriptions: N embeddings -> N adapters.

With `base_rank > 0` the network generates a residual: each adapter's first `base_rank` ranks are a fixed base
adapter (the multi-task LoRA, stored as buffers in the checkpoint) and the heads emit the other ranks. Training
then starts from the base adapter's quality and learns only what a description adds to it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from generator.hypernet.config import HypernetConfig
from generator.registry import registrar

HYPERNETS: dict[str, type[Hypernet]] = {}
_B_GAIN = 0.01  # generated B starts small (a fresh adapter nudges the model; LoRA's B=0 init, softened)


register = registrar(HYPERNETS, "variant")


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
        self.gen_rank = cfg.rank - cfg.base_rank  # ranks the heads generate
        for m, (d_in, d_out) in self.shapes.items() if cfg.base_rank else ():  # the fixed base adapter
            self.register_buffer(f"base_a_{m}", torch.zeros(cfg.spec.n_layers, cfg.base_rank, d_in))
            self.register_buffer(f"base_b_{m}", torch.zeros(cfg.spec.n_layers, d_out, cfg.base_rank))
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

    def _trunk(self, task_emb: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """The trunk on every (module, *extra, task, layer) combination -> `(M, *K, N, L, hidden)`.

        The trunk's input is the concatenation [task, layer, module, *extra] (`extra[i]` is `(K_i, pos_dim)`).
        Its first linear is applied to each part alone and the results broadcast-added, which equals
        applying it to the concatenation without materialising one row per combination for it.
        Module and extra axes lead so that each head reads a contiguous slice.
        """
        first = self.trunk[0]
        parts = [self.task_encoder(task_emb), self.layer_emb.weight, self.module_emb.weight, *extra]
        weights = first.weight.split([p.shape[-1] for p in parts], dim=1)
        task, layer, module, *rest = (nn.functional.linear(p, w) for p, w in zip(parts, weights, strict=True))
        k = len(rest)
        x = first.bias + module.view(-1, *[1] * (k + 2), module.shape[-1])  # (M, 1.., H)
        for i, e in enumerate(rest):
            x = x + e.view(*[1] * (i + 1), -1, *[1] * (k - i + 1), e.shape[-1])  # (1, .., K_i, .., 1, 1, H)
        x = x + task.view(*[1] * (k + 1), -1, 1, task.shape[-1])  # (1, .., N, 1, H)
        x = x + layer.view(*[1] * (k + 2), -1, layer.shape[-1])  # (M, *K, N, L, H)
        return self.trunk[1:](x)

    def forward(self, task_emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`(N, embed_dim)` -> A `{m: (N, L, r, d_in)}` and B `{m: (N, L, d_out, r)}`."""
        if task_emb.dim() != 2 or task_emb.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"task embeddings must be (N, {self.cfg.embed_dim}), got {tuple(task_emb.shape)}")
        a, b = self._heads(task_emb)
        if not self.cfg.base_rank:
            return a, b
        n = task_emb.shape[0]
        a = {m: torch.cat([self.get_buffer(f"base_a_{m}").expand(n, -1, -1, -1), t], dim=2) for m, t in a.items()}
        b = {m: torch.cat([self.get_buffer(f"base_b_{m}").expand(n, -1, -1, -1), t], dim=3) for m, t in b.items()}
        return a, b

    @torch.no_grad()
    def set_base(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scaling: float) -> None:
        """Make a LoRA (A `{m: (L, base_rank, d_in)}`, B `{m: (L, d_out, base_rank)}`, applied at `scaling`) the
        fixed leading ranks of every generated adapter; B is rescaled to this network's alpha / rank."""
        if set(a) != set(self.shapes):
            raise ValueError(f"base adapter targets {sorted(a)} differ from the hypernetwork's {sorted(self.shapes)}")
        ratio = scaling / (self.cfg.alpha / self.cfg.rank)
        for m in self.shapes:
            self.get_buffer(f"base_a_{m}").copy_(a[m])
            self.get_buffer(f"base_b_{m}").copy_(b[m] * ratio)

    def _heads(self, task_emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _init_head(self, head: nn.Linear, rows_a: int, d_a: int) -> None:
        """Scale a head so generated A starts near Kaiming scale for d_a and B near _B_GAIN times that."""
        nn.init.normal_(head.weight, std=1.0 / math.sqrt(self.cfg.hidden_dim * d_a))
        nn.init.zeros_(head.bias)
        if rows_a < head.weight.shape[0]:
            head.weight.data[rows_a:] *= _B_GAIN


def _head_rows(head: nn.Linear, h: torch.Tensor, n_out: int, gain: torch.Tensor) -> torch.Tensor:
    """`gain * head(h)[..., :n_out]`, computing only those outputs (a shared head is as wide as the wider of
    A and B) and applying `gain` to whichever is smaller: the head's weights (large batches, training) or its
    output (a few adapters, as in serving: scaling 2.4M weights took a quarter of one adapter's forward)."""
    weight, bias = head.weight[:n_out], head.bias[:n_out]
    if h.numel() // h.shape[-1] * n_out <= weight.numel():
        return nn.functional.linear(h, weight, bias) * gain
    return nn.functional.linear(h, weight * gain, bias * gain)


@register("L")
class HypernetL(Hypernet):
    """One head call per (layer, module) emits A and B together."""

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__(cfg)
        r = self.gen_rank
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.hidden_dim, r * (i + o)) for m, (i, o) in self.shapes.items()})
        for m, (d_in, _) in self.shapes.items():
            self._init_head(self.heads[m], r * d_in, d_in)

    def _heads(self, task_emb):
        h = self._trunk(task_emb)  # (M, N, L, H)
        n, n_layers, r = h.shape[1], h.shape[2], self.gen_rank
        a, b = {}, {}
        for j, (m, (d_in, d_out)) in enumerate(self.shapes.items()):
            out = self.heads[m](h[j])  # (N, L, r*(d_in+d_out))
            a[m] = out[..., : r * d_in].reshape(n, n_layers, r, d_in)
            b[m] = out[..., r * d_in:].reshape(n, n_layers, r, d_out).transpose(-1, -2)
        return a, b


@register("M")
class HypernetM(Hypernet):
    """One head per module shared by A and B (output width r * max(d_in, d_out)), told apart by an A/B embedding."""

    n_extra_pos = 1

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__(cfg)
        r = self.gen_rank
        self.ab_emb = nn.Embedding(2, cfg.pos_dim)
        self.gain = nn.Parameter(torch.tensor([1.0, _B_GAIN]))  # output scale of A and of B
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.hidden_dim, r * max(i, o)) for m, (i, o) in self.shapes.items()})
        for m, (d_in, _) in self.shapes.items():
            self._init_head(self.heads[m], self.heads[m].weight.shape[0], d_in)

    def _heads(self, task_emb):
        h = self._trunk(task_emb, self.ab_emb.weight)  # (M, 2, N, L, H)
        n, n_layers, r = h.shape[2], h.shape[3], self.gen_rank
        a, b = {}, {}
        for j, (m, (d_in, d_out)) in enumerate(self.shapes.items()):
            head = self.heads[m]
            a[m] = _head_rows(head, h[j, 0], r * d_in, self.gain[0]).reshape(n, n_layers, r, d_in)
            b[m] = _head_rows(head, h[j, 1], r * d_out, self.gain[1]).reshape(n, n_layers, r, d_out).transpose(-1, -2)
        return a, b


@register("S")
class HypernetS(Hypernet):
    """One head call per rank-one slice: A/B and rank embeddings pick which row of A or column of B.

    The trunk runs once per (layer, module); each slice then modulates its output with a scale and shift
    computed from the slice's A/B and rank embeddings (FiLM) before the head. Feeding those embeddings
    into the trunk instead would run the whole trunk 2r times per (layer, module): 16x the work at r=8,
    about 50 ms per SmolLM2 adapter on a 2-core CPU against a 20 ms target.
    """

    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__(cfg)
        self.ab_emb = nn.Embedding(2, cfg.pos_dim)
        self.rank_emb = nn.Embedding(self.gen_rank, cfg.pos_dim)
        self.slice_film = nn.Linear(2 * cfg.pos_dim, 2 * cfg.hidden_dim)  # [A/B, rank] -> (scale, shift)
        self.gain = nn.Parameter(torch.tensor([1.0, _B_GAIN]))
        self.heads = nn.ModuleDict({m: nn.Linear(cfg.hidden_dim, max(i, o)) for m, (i, o) in self.shapes.items()})
        for m, (d_in, _) in self.shapes.items():
            self._init_head(self.heads[m], self.heads[m].weight.shape[0], d_in)

    def _film(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice scale and shift, each `(2, r, 1, 1, H)` (A/B, rank, broadcast over N and L)."""
        r, dim = self.gen_rank, self.cfg.pos_dim
        emb = torch.cat([self.ab_emb.weight[:, None].expand(2, r, dim),
                         self.rank_emb.weight[None].expand(2, r, dim)], dim=-1)  # (2, r, 2*pos_dim)
        scale, shift = self.slice_film(emb)[:, :, None, None, :].chunk(2, dim=-1)
        return 1 + scale, shift

    def _heads(self, task_emb):
        h = self._trunk(task_emb)  # (M, N, L, H)
        scale, shift = self._film()
        a, b = {}, {}
        for j, (m, (d_in, d_out)) in enumerate(self.shapes.items()):
            head = self.heads[m]
            z = nn.functional.silu(torch.addcmul(shift[0], h[j], scale[0]))  # A's r slices: (r, N, L, H)
            a[m] = _head_rows(head, z, d_in, self.gain[0]).permute(1, 2, 0, 3)  # (N, L, r, d_in)
            z = nn.functional.silu(torch.addcmul(shift[1], h[j], scale[1]))  # B's r slices: (r, N, L, H)
            b[m] = _head_rows(head, z, d_out, self.gain[1]).permute(1, 2, 3, 0)  # (N, L, d_out, r)
        return a, b
