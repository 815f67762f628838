"""A pre-allocated pool of adapter slots on the engine's device, gathered per row inside the decode step.

The target linears of a Llama layer fall into groups that share an input: q/k/v (the attention norm's
output), o, gate/up (the MLP norm's output), down. For every group the pool holds
  a[g]  `(n_layers, n_slots, T_g * rank, d_in)`   the A factors of the group's targets stacked along rank,
  bt[g] `(n_layers, n_slots, T_g * rank, d_out_g)` the scaled B factors, transposed, block-placed at each
                                                   target's columns of the fused output (zeros elsewhere),
so one row's LoRA delta for a whole group is two batched matmuls (the BGMV idea). Slot 0 is all zeros
(base-model rows and padding). Ranks below the pool's rank are zero-padded; adapters are copied in from
the engine's LRU cache when a batch needs them and evicted least recently used first (never while a live
row uses them).

A row's adapters do not change while it decodes, so the gather happens once, when the row joins
(`assign`): its slots' factors, the B side times its mixture weights, are copied into per-row buffers
  row_a[g] `(n_layers, n_rows, max_mix * T_g * rank, d_in)`, row_bt[g] `(n_layers, n_rows, ..., d_out_g)`,
and the decode step reads them in place: x @ A^T, then y + h @ Bt, two kernels per group and layer
(`lora_delta`). Imports only torch and `generator`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

import torch

from generator.lora import LoraAdapter
from generator.spec import ModelSpec

logger = logging.getLogger(__name__)

# fused group -> its targets in the order of the fused output columns
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class AdapterPool:
    """`n_slots` adapter slots (plus the zero slot 0) for `targets`, rank `rank`, on `device`."""

    def __init__(self, spec: ModelSpec, targets: Iterable[str], n_slots: int, rank: int,
                 device: torch.device | str, dtype: torch.dtype, n_rows: int = 1, max_mix: int = 1) -> None:
        if n_slots < 1 or rank < 1:
            raise ValueError(f"an adapter pool needs n_slots >= 1 and rank >= 1, got {n_slots}, {rank}")
        self.spec, self.rank, self.n_slots = spec, rank, n_slots
        targets = set(targets)
        self.groups = {g: tuple(m for m in ms if m in targets) for g, ms in GROUPS.items()}
        self.groups = {g: ms for g, ms in self.groups.items() if ms}
        self.n_rows, self.max_mix = n_rows, max_mix
        self.a: dict[str, torch.Tensor] = {}
        self.bt: dict[str, torch.Tensor] = {}
        self.row_a: dict[str, torch.Tensor] = {}
        self.row_bt: dict[str, torch.Tensor] = {}
        self.columns: dict[str, tuple[str, int, int]] = {}  # target -> (group, first output column, rank row)
        for g, ms in self.groups.items():
            d_in = spec.shapes[ms[0]][0]
            fused = GROUPS[g]
            d_out = sum(spec.shapes[m][1] for m in fused)
            self.a[g] = torch.zeros(spec.n_layers, n_slots + 1, len(ms) * rank, d_in, device=device, dtype=dtype)
            self.bt[g] = torch.zeros(spec.n_layers, n_slots + 1, len(ms) * rank, d_out, device=device, dtype=dtype)
            width = max_mix * len(ms) * rank
            self.row_a[g] = torch.zeros(spec.n_layers, n_rows, width, d_in, device=device, dtype=dtype)
            self.row_bt[g] = torch.zeros(spec.n_layers, n_rows, width, d_out, device=device, dtype=dtype)
            for j, m in enumerate(ms):
                col = sum(spec.shapes[x][1] for x in fused[: fused.index(m)])
                self.columns[m] = (g, col, j * rank)
        self._slots: OrderedDict[str, tuple[int, LoraAdapter]] = OrderedDict()  # key -> (slot, adapter), LRU first
        self._free = list(range(1, n_slots + 1))

    def nbytes(self) -> int:
        tensors = (*self.a.values(), *self.bt.values(), *self.row_a.values(), *self.row_bt.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def assign(self, rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Give `rows` (row ids `(n,)`) the mixture of pool slots `index` with `weights`, both `(n, max_mix)`."""
        n, k = index.shape
        for g in self.groups:
            width = self.a[g].shape[2]
            ga = self.a[g][:, index]  # (L, n, K, T_g * R, d_in)
            w = weights.to(self.bt[g].dtype)[None, :, :, None, None]  # (1, n, K, 1, 1)
            gb = self.bt[g][:, index] * w  # (L, n, K, T_g * R, d_out)
            self.row_a[g][:, rows] = ga.reshape(ga.shape[0], n, k * width, ga.shape[-1])
            self.row_bt[g][:, rows] = gb.reshape(gb.shape[0], n, k * width, gb.shape[-1])

    def rows_factors(self, rows: torch.Tensor, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every group's factors for the rows `rows` `(n,)`, first `k` mixture entries, all layers:
        group -> `(L, n, kW, d_in)`, `(L, n, kW, d_out)` (gathered copies, once per prefill)."""
        out = {}
        for g in self.row_a:
            width = k * self.a[g].shape[2]
            out[g] = self.row_a[g][:, rows, :width], self.row_bt[g][:, rows, :width]
        return out

    def row_factors(self, group: str, layer: int, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows 0..b-1's factors of `group` at `layer`, first `k` mixture entries: `(b, kW, d_in)`, `(b, kW, d_out)`."""
        if group not in self.row_a:
            return None
        width = k * self.a[group].shape[2]
        return self.row_a[group][layer, :b, :width], self.row_bt[group][layer, :b, :width]

    def slots_for(self, adapters: dict[str, LoraAdapter], pinned: set[str] = frozenset()) -> dict[str, int]:
        """Slot of every adapter in `adapters` (key -> adapter from the engine's cache), loading the missing
        ones over the least recently used slots not in `pinned` (keys live rows still decode with)."""
        out = {}
        for key, ad in adapters.items():
            held = self._slots.get(key)
            if held is not None and held[1] is ad:
                self._slots.move_to_end(key)
                out[key] = held[0]
                continue
            self._check(ad)
            slot = held[0] if held is not None else self._take(pinned | set(adapters))
            self._write(slot, ad)
            self._slots[key] = (slot, ad)
            self._slots.move_to_end(key)
            out[key] = slot
        return out

    def _take(self, keep: set[str]) -> int:
        if self._free:
            return self._free.pop(0)
        for key in self._slots:
            if key not in keep:
                slot, _ = self._slots.pop(key)
                logger.debug("adapter pool: evicted %s from slot %d", key, slot)
                return slot
        raise ValueError(f"all {self.n_slots} adapter pool slots hold adapters of live rows: raise pool_slots")

    def _check(self, ad: LoraAdapter) -> None:
        if ad.rank > self.rank:
            raise ValueError(f"adapter rank {ad.rank} exceeds the adapter pool's rank {self.rank}: raise pool_rank")
        missing = set(ad.target_modules) - set(self.columns)
        if missing:
            raise ValueError(f"adapter targets {sorted(missing)}, which the adapter pool does not hold")

    def _write(self, slot: int, ad: LoraAdapter) -> None:
        for g in self.groups:
            self.a[g][:, slot].zero_()
            self.bt[g][:, slot].zero_()
        for m in ad.target_modules:
            g, col, row = self.columns[m]
            d_out = self.spec.shapes[m][1]
            a = ad.a[m].to(self.a[g].device, self.a[g].dtype)  # (L, r, d_in)
            bt = (ad.b[m] * ad.scaling).transpose(1, 2).to(self.bt[g].device, self.bt[g].dtype)  # (L, r, d_out)
            self.a[g][:, slot, row: row + ad.rank] = a
            self.bt[g][:, slot, row: row + ad.rank, col: col + d_out] = bt


def lora_delta(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, fused: bool = True
               ) -> torch.Tensor:
    """y + each row's low-rank update of x: x `(b, d_in)`, y `(b, d_out)`, a `(b, W, d_in)`, bt `(b, W, d_out)`.

    fused: the add inside the second matmul (one rounding); else rounded before the add, as HF's path does.
    """
    h = torch.bmm(a, x.to(a.dtype)[:, :, None]).transpose(1, 2)  # (b, 1, W)
    if fused:
        return torch.baddbmm(y[:, None].to(bt.dtype), h, bt)[:, 0].to(y.dtype)  # (b, d_out)
    return y + torch.bmm(h, bt)[:, 0].to(y.dtype)


def lora_delta_seq(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, fused: bool = True
                   ) -> torch.Tensor:
    """`lora_delta` for whole prompts: x `(n, T, d_in)`, y `(n, T, d_out)`, a `(n, W, d_in)`, bt `(n, W, d_out)`."""
    h = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # (n, T, W)
    if fused:
        return torch.baddbmm(y.to(bt.dtype), h, bt).to(y.dtype)  # (n, T, d_out)
    return y + torch.bmm(h, bt).to(y.dtype)
