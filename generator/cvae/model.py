"""A conditional VAE over LoRA parameters (after ICM-LoRA): q(z | adapter, condition), p(adapter | z, condition).

An adapter is handled as rows, one tensor per (module, A|B) "kind": A `(L, r, d_in)` as is, B `(L, d_out, r)`
transposed to `(L, r, d_out)`. The condition is the task-description embedding plus, when given, the mean
embedding of a few examples of the task (ICM-LoRA's in-context task vector).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from generator.cvae.config import CVAEConfig


class RowLayout:
    """The kinds `(module, part, width)` in canonical order, and conversions between (A, B) and rows."""

    def __init__(self, cfg: CVAEConfig) -> None:
        self.kinds: list[tuple[str, str, int]] = []
        for m in cfg.target_modules:
            d_in, d_out = cfg.spec.shapes[m]
            self.kinds += [(m, "A", d_in), (m, "B", d_out)]
        self.n_layers, self.rank = cfg.spec.n_layers, cfg.rank

    @staticmethod
    def key(module: str, part: str) -> str:
        return f"{module}_{part}"

    def keys(self) -> list[str]:
        return [self.key(m, p) for m, p, _ in self.kinds]

    def n_params(self) -> int:
        return sum(self.n_layers * self.rank * d for _, _, d in self.kinds)

    def to_rows(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """A `{m: (N, L, r, d_in)}`, B `{m: (N, L, d_out, r)}` -> rows `[(N, L, r, d)]` per kind."""
        return [a[m] if p == "A" else b[m].transpose(-1, -2) for m, p, _ in self.kinds]

    def from_rows(self, rows: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        a, b = {}, {}
        for (m, p, _), t in zip(self.kinds, rows, strict=True):
            if p == "A":
                a[m] = t  # (N, L, r, d_in)
            else:
                b[m] = t.transpose(-1, -2).contiguous()  # (N, L, d_out, r)
        return a, b


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden), nn.SiLU())


class LoraCVAE(nn.Module):
    """Encoder, decoder, the condition projection and the parameter normaliser (buffers, saved with it)."""

    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = RowLayout(cfg)
        n_l, r, n_k = cfg.spec.n_layers, cfg.rank, len(self.layout.kinds)
        keys_dims = [(self.layout.key(m, p), d) for m, p, d in self.layout.kinds]
        for key, d in keys_dims:
            self.register_buffer(f"mean_{key}", torch.zeros(n_l, r, d))  # per-element library mean
            self.register_buffer(f"std_{key}", torch.ones(n_l))  # per-(layer, kind) std around that mean
        self.desc_proj = nn.Linear(cfg.embed_dim, cfg.cond_dim)
        self.ex_proj = nn.Linear(cfg.embed_dim, cfg.cond_dim)
        # encoder q(z | rows, c)
        self.enc_rows = nn.ModuleDict({key: nn.Linear(d, cfg.tok_dim) for key, d in keys_dims})
        self.enc_pos = nn.Parameter(0.02 * torch.randn(n_k, r, cfg.tok_dim))  # which kind and rank a row is
        self.enc_layer = nn.Linear(n_k * r * cfg.tok_dim, cfg.layer_dim)
        self.enc_trunk = _mlp(n_l * cfg.layer_dim + cfg.cond_dim, cfg.hidden_dim)
        self.enc_head = nn.Linear(cfg.hidden_dim, 2 * cfg.z_dim)
        # decoder p(rows | z, c)
        self.dec_trunk = _mlp(cfg.z_dim + cfg.cond_dim, cfg.hidden_dim)
        self.dec_layer = nn.Linear(cfg.hidden_dim, n_l * cfg.layer_dim)
        self.dec_tok = nn.Linear(cfg.layer_dim, n_k * r * cfg.tok_dim)  # one small vector per (kind, rank)
        self.dec_expand = nn.Linear(cfg.tok_dim, cfg.dec_dim)  # shared; with the head, rows span dec_dim directions
        self.dec_heads = nn.ModuleDict({key: nn.Linear(cfg.dec_dim, d) for key, d in keys_dims})
        nn.init.zeros_(self.enc_head.bias)
        with torch.no_grad():
            self.enc_head.bias[cfg.z_dim:] = -2.0  # start with small posterior variances

    # -- condition and normalisation --------------------------------------------------------------------

    def condition(self, desc_emb: torch.Tensor, ex_emb: torch.Tensor | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
        """`(N, D)` description [+ `(N, D)` examples, rows of zeros where absent] -> `(N, cond_dim)`.

        `keep` `(N,)` in {0, 1} drops the whole condition of a sample (condition dropout in training).
        """
        c = self.desc_proj(desc_emb)
        if ex_emb is not None:
            present = (ex_emb.abs().sum(-1, keepdim=True) > 0).to(c.dtype)  # (N, 1)
            c = c + present * self.ex_proj(ex_emb)
        return c if keep is None else c * keep[:, None].to(c.dtype)

    def _stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"mean_{k}"), getattr(self, f"std_{k}")) for k in self.layout.keys()]

    def normalise(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(x - mu) / sd[:, None, None] for x, (mu, sd) in zip(rows, self._stats(), strict=True)]

    def denormalise(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x * sd[:, None, None] + mu for x, (mu, sd) in zip(rows, self._stats(), strict=True)]

    @torch.no_grad()
    def fit_normaliser(self, rows: list[torch.Tensor]) -> None:
        """Set the normaliser from every library sample: rows `[(n_samples, L, r, d)]`."""
        for x, (mu, sd) in zip(rows, self._stats(), strict=True):
            mu.copy_(x.mean(0))
            dev = (x - x.mean(0)).pow(2).mean(dim=(0, 2, 3)).sqrt()  # (L,)
            sd.copy_(torch.where(dev > 1e-12, dev, torch.ones_like(dev)))

    @torch.no_grad()
    def init_untrained_normaliser(self, b_std: float = 1e-4) -> None:
        """For a fresh model: mean 0, A at Kaiming scale for its d_in, B tiny (adapters near the identity)."""
        for (_, part, d), (mu, sd) in zip(self.layout.kinds, self._stats(), strict=True):
            mu.zero_()
            sd.fill_(1.0 / math.sqrt(d) if part == "A" else b_std)

    # -- encoder and decoder ----------------------------------------------------------------------------

    def encode(self, rows_n: list[torch.Tensor], cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised rows `[(N, L, r, d)]`, cond `(N, cond_dim)` -> mu, logvar `(N, z_dim)`."""
        toks = torch.stack([self.enc_rows[k](x) for k, x in zip(self.layout.keys(), rows_n, strict=True)], 2)
        toks = toks + self.enc_pos  # (N, L, kinds, r, tok_dim)
        per_layer = nn.functional.silu(self.enc_layer(toks.flatten(2)))  # (N, L, layer_dim)
        h = self.enc_trunk(torch.cat([per_layer.flatten(1), cond], -1))  # (N, hidden)
        mu, logvar = self.enc_head(h).chunk(2, dim=-1)  # (N, z_dim) each
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        """z `(N, z_dim)`, cond `(N, cond_dim)` -> normalised rows `[(N, L, r, d)]`."""
        n, n_l, r = z.shape[0], self.cfg.spec.n_layers, self.cfg.rank
        h = self.dec_trunk(torch.cat([z, cond], -1))  # (N, hidden)
        per_layer = nn.functional.silu(self.dec_layer(h)).view(n, n_l, self.cfg.layer_dim)  # (N, L, layer_dim)
        toks = nn.functional.silu(self.dec_tok(per_layer)).view(n, n_l, len(self.layout.kinds), r, self.cfg.tok_dim)
        toks = nn.functional.silu(self.dec_expand(toks))  # (N, L, kinds, r, dec_dim)
        return [self.dec_heads[k](toks[:, :, j]) for j, k in enumerate(self.layout.keys())]  # (N, L, r, d)

    def decode_factors(self, z: torch.Tensor, cond: torch.Tensor) -> tuple[dict[str, torch.Tensor],
                                                                            dict[str, torch.Tensor]]:
        """z, cond -> A `{m: (N, L, r, d_in)}`, B `{m: (N, L, d_out, r)}` in parameter units."""
        return self.layout.from_rows(self.denormalise(self.decode(z, cond)))

    def encode_factors(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                       cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(self.normalise(self.layout.to_rows(a, b)), cond)

    def num_weights(self) -> int:
        """Trainable parameters (the normaliser buffers are counted apart)."""
        return sum(p.numel() for p in self.parameters())

    def num_buffer_values(self) -> int:
        return sum(b.numel() for b in self.buffers())
