"""Next-token choice for a whole batch on the device, with no host sync and no per-row generator objects,
so it can sit inside a captured CUDA graph.

Greedy rows take the argmax. Sampling rows draw with the Gumbel-max trick over their temperature-scaled,
nucleus-truncated distribution; the uniform noise is a counter-based hash of (row seed, row's token
counter, rank in the sorted vocabulary), so a seeded sequence draws the same tokens whatever batch it
shares and whichever bucket or graph decodes it. Imports only torch.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def hash_uniform(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """seed, counter `(b,)` int64 -> uniform floats in (0, 1), `(b, n)`: a 32-bit integer hash (lowbias32)."""
    j = torch.arange(n, device=seed.device, dtype=torch.int64)[None]  # (1, n)
    x = ((seed[:, None] & _MASK32) * 0x9E3779B1 + (counter[:, None] & _MASK32) * 0x85EBCA77 + j) & _MASK32
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * mul) & _MASK32
    x = x ^ (x >> 16)
    return ((x >> 8).float() + 0.5) / float(1 << 24)  # (b, n), 24 random bits


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                  counter: torch.Tensor, sample: bool) -> torch.Tensor:
    """logits `(b, vocab)` float; per-row temperature, top_p (float), seed, counter (int64) `(b,)` -> tokens `(b,)`.

    With `sample` False every row is greedy (the cheap graph); with it True rows whose temperature is 0
    still take the argmax.
    """
    greedy = logits.argmax(-1)  # (b,)
    if not sample:
        return greedy
    scaled = logits / temperature.clamp(min=1e-5)[:, None]  # (b, vocab)
    probs = torch.softmax(scaled, -1)
    p_sorted, order = probs.sort(-1, descending=True)  # (b, vocab)
    cut = (p_sorted.cumsum(-1) - p_sorted) >= top_p[:, None]  # keep the smallest prefix reaching top_p
    logp = torch.log(p_sorted).masked_fill(cut, float("-inf"))
    gumbel = -torch.log(-torch.log(hash_uniform(seed, counter, logits.shape[-1])))
    pick = (logp + gumbel).argmax(-1, keepdim=True)  # (b, 1), a rank in the sorted order
    drawn = order.gather(1, pick)[:, 0]
    return torch.where(temperature > 0, drawn, greedy)
