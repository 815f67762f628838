"""A pre-allocated KV cache in slots: one slot per live sequence, sequences join and leave by slot index.

Nothing is concatenated or re-allocated while decoding: a joining sequence's prefilled keys and values are
copied into a free slot (positions 0..n-1), every decode step writes one position per slot in place, and a
leaving sequence just frees its slot (the next tenant overwrites it; attention masks positions past each
row's own). Imports only torch.
"""

from __future__ import annotations

import torch


class KVSlots:
    """keys[l], values[l]: `(n_slots, n_kv_heads, max_len, head_dim)` for every decoder layer l."""

    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, spare: int = 0) -> None:
        """`spare` more slots (indices n_slots, n_slots + 1, ...) are allocated but never handed out: scratch
        space, e.g. for the padding rows of a fixed-shape prefill."""
        if min(n_layers, n_slots, n_kv_heads, max_len, head_dim) < 1:
            raise ValueError(f"KV slot shape must be positive, got layers={n_layers} slots={n_slots} "
                             f"kv_heads={n_kv_heads} max_len={max_len} head_dim={head_dim}")
        self.n_slots, self.max_len = n_slots, max_len
        shape = (n_slots + spare, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self._free = list(range(n_slots))  # lowest slot first: live rows stay packed at the front

    @property
    def n_free(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def take(self, n: int) -> list[int]:
        """Reserve `n` free slots (the lowest ones)."""
        if n > len(self._free):
            raise ValueError(f"{n} sequences asked for KV slots but only {len(self._free)} of {self.n_slots} are free")
        self._free.sort()
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def release(self, slots: list[int]) -> None:
        for s in slots:
            if s in self._free or not 0 <= s < self.n_slots:
                raise ValueError(f"slot {s} is not taken (slots 0..{self.n_slots - 1})")
            self._free.append(s)

    def fill(self, slots: list[int], lengths: list[int], layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy left-padded prefill caches into `slots`: layer_kv[l] = (keys, values), each `(rows, kv, T, hd)`;
        row i's `lengths[i]` real positions end at T and land at slot positions 0..lengths[i]-1."""
        rows = len(slots)
        t = layer_kv[0][0].shape[2]
        if t > self.max_len:
            raise ValueError(f"a prefill of {t} positions does not fit KV slots of {self.max_len} positions")
        device = self.keys[0].device
        n = torch.tensor(lengths, device=device)
        src = (torch.arange(t, device=device)[None] + (t - n)[:, None]).clamp(max=t - 1)  # (rows, T)
        idx = torch.tensor(slots, device=device)
        for layer, (k, v) in enumerate(layer_kv):
            gather = src[:, None, :, None].expand(rows, k.shape[1], t, k.shape[3])  # (rows, kv, T, hd)
            self.keys[layer][idx, :, :t] = k.gather(2, gather).to(self.keys[layer].dtype)
            self.values[layer][idx, :, :t] = v.gather(2, gather).to(self.values[layer].dtype)
