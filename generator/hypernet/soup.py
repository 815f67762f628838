"""Averaging Text-to-LoRA hypernetworks trained with the same recipe.

`soup`: the weight average of runs that started from the same initialisation (`training.pipeline --init-seed`) and
differ in their sampling seed. One network again: it costs what one member costs to run and to store.
`MeanOfHypernets`: the average of the members' *adapters* (any runs): their generated ranks side by side, each B
scaled by its weight, after the base ranks they share. K members cost K forward passes, so it measures what
averaging can give rather than being served.
`base_adapter`: a residual network's fixed base adapter (e.g. the multi-task LoRA) as a LoRA of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from generator.hypernet.model import Hypernet, build_hypernet
from generator.lora import LoraAdapter


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if n < 1:
        raise ValueError("averaging needs at least one hypernetwork")
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or any(x < 0 for x in w) or not sum(w) > 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {weights!r}")
    if weights is None:
        return w
    total = sum(w)
    return [x / total for x in w]


def check_same_shapes(nets: Sequence[Hypernet]) -> None:
    """Refuse to average networks that differ in anything but their training record (`extra`), or whose fixed
    base adapters differ."""
    first = replace(nets[0].cfg, extra={})
    for i, net in enumerate(nets[1:], 1):
        if replace(net.cfg, extra={}) != first:
            raise ValueError(f"hypernetwork {i} has another config than hypernetwork 0: only runs of one recipe "
                             "(variant, rank, widths, base adapter) can be averaged")
    for name, buf in nets[0].named_buffers():
        for i, net in enumerate(nets[1:], 1):
            if not torch.equal(buf, net.get_buffer(name)):
                raise ValueError(f"hypernetwork {i}'s base adapter ({name}) differs from hypernetwork 0's")


def soup(nets: Sequence[Hypernet], weights: Sequence[float] | None = None) -> Hypernet:
    """The weighted average of the members' weights (uniform by default), as one network of the same config.

    Only meaningful for runs from one initialisation; `init_seed` in their records says whether they share it.
    """
    w = _weights(len(nets), weights)
    check_same_shapes(nets)
    seeds = {n.cfg.extra.get("init_seed", n.cfg.extra.get("seed", 0)) for n in nets}
    if len(seeds) > 1:
        raise ValueError(f"the members started from different initialisations (seeds {sorted(seeds)}): a weight "
                         "average of them is not a trained network; train them with one --init-seed")
    states = [n.state_dict() for n in nets]
    avg = {k: sum(wi * s[k].float() for wi, s in zip(w, states, strict=True)) for k in states[0]}
    out = build_hypernet(replace(nets[0].cfg, extra={"soup_of": len(nets), "soup_weights": w}))
    out.load_state_dict(avg)
    return out.to(next(nets[0].parameters()).device).eval()


class MeanOfHypernets(nn.Module):
    """Adapters whose generated part is the weighted mean of the members' generated parts.

    Members share their config and base adapter. The adapter's ranks are the base's, then every member's
    generated ranks; B of member k is scaled by its weight, so the update is base + sum_k w_k * (member k's
    residual) at the members' scaling. `cfg` is the members' with the rank (and alpha, keeping alpha / rank) grown.
    """

    def __init__(self, nets: Sequence[Hypernet], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        check_same_shapes(nets)
        self.members = nn.ModuleList(nets)
        self.weights = _weights(len(nets), weights)
        c = nets[0].cfg
        rank = c.base_rank + len(nets) * (c.rank - c.base_rank)
        self.cfg = replace(c, rank=rank, alpha=c.alpha / c.rank * rank, extra={"mean_of": len(nets)})

    def forward(self, task_emb: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        outs = [net(task_emb) for net in self.members]
        r0 = self.cfg.base_rank
        a = {m: torch.cat([outs[0][0][m][:, :, :r0], *[o[0][m][:, :, r0:] for o in outs]], dim=2) for m in outs[0][0]}
        b = {m: torch.cat([outs[0][1][m][..., :r0], *[w * o[1][m][..., r0:] for w, o in
                                                      zip(self.weights, outs, strict=True)]], dim=3)
             for m in outs[0][1]}
        return a, b


def base_adapter(net: Hypernet) -> LoraAdapter:
    """A residual network's fixed leading ranks as a LoRA with the same update (its scaling kept)."""
    c = net.cfg
    if not c.base_rank:
        raise ValueError("this hypernetwork has no base adapter (base_rank 0)")
    a = {m: net.get_buffer(f"base_a_{m}").detach().float().cpu().clone() for m in net.shapes}
    b = {m: net.get_buffer(f"base_b_{m}").detach().float().cpu().clone() for m in net.shapes}
    return LoraAdapter(c.spec.name, c.base_rank, c.alpha / c.rank * c.base_rank, a, b,
                       metadata={"source": "base adapter of a residual hypernetwork"})
