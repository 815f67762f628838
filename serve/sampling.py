"""Choosing the next token of each row, numerically safe and row by row.

Every row is judged on its own: a row whose logits hold NaN or +Inf (or only -Inf) cannot be sampled, and
`choose_tokens` reports it instead of letting it poison `torch.multinomial` for the whole batch; the engine
then ends that sequence alone with an error. Sampling works in float32 log space: log-softmax first, then
the temperature divides log-probabilities whose maximum is 0, so a tiny temperature cannot overflow
(below `MIN_TEMPERATURE` a row is greedy), and the nucleus always keeps the most likely token, so a tiny
`top_p` cannot leave nothing to sample from.

The request-level ranges (what the API accepts) are in serve/engine_config.py (no torch there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serve.engine_config import MAX_SEED, MAX_TEMPERATURE, MIN_SEED, MIN_TEMPERATURE  # noqa: F401 - re-exported


@dataclass(frozen=True)
class RowSampling:
    """How one row picks its token: temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    """Raise ValueError naming the field when a request's sampling values are out of the documented ranges."""
    if temperature != 0.0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                         f"got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a 64-bit integer in [{MIN_SEED}, {MAX_SEED}]")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one sampled sequence; any int is folded into 64 bits, None draws a random seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(7), "little") if seed is None else int(seed) % 2**64)
    return gen


def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: rows that cannot be sampled (a NaN or +Inf logit, or no finite one). Logits: (rows, vocab)."""
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from a finite row `(vocab,)` at `temperature` within the `top_p` nucleus (greedy below
    `MIN_TEMPERATURE`, where dividing by a denormal could give 0/0)."""
    if temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    lp = torch.log_softmax(logits.float(), -1)  # (vocab,), max 0
    lp = torch.log_softmax(lp / temperature, -1)  # still max 0: no overflow for tiny temperatures
    if top_p < 1.0:
        lp_sorted, order = lp.sort(descending=True)  # (vocab,)
        p_sorted = lp_sorted.exp()
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p
        drop[0] = False  # the most likely token always stays
        lp = torch.full_like(lp, float("-inf")).scatter_(0, order, lp_sorted.masked_fill(drop, float("-inf")))
    probs = (lp - lp.max()).exp()  # (vocab,), in [0, 1], the top one exactly 1
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowSampling], fill: int) -> tuple[torch.Tensor, list[int]]:
    """Next token per row `(rows,)` and the indices of rows that cannot be sampled (their token is `fill`).

    Greedy rows take the argmax; sampled rows draw with their own generator.
    """
    logits = logits.float()  # (rows, vocab)
    bad = bad_rows(logits)
    tokens = logits.nan_to_num(nan=float("-inf")).argmax(-1)  # (rows,)
    sampled = [r for r, s in enumerate(rows) if s.temperature > 0]
    failed = bad.nonzero().flatten().tolist() if bool(bad.any()) else []
    for r in sampled:
        if r not in failed:
            tokens[r] = sample_row(logits[r], rows[r].temperature, rows[r].top_p, rows[r].generator)
    if failed:
        tokens[torch.tensor(failed, device=tokens.device)] = fill
    return tokens, failed
