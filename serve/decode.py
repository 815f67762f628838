"""A decode batch that sequences can join between steps (continuous batching).

`DecodeBatch.add(jobs)` prefills the new prompts on their own, then merges them into the running batch:
KV caches and attention masks are left-padded to a common length and concatenated along the batch, and
the per-sample LoRA factors are concatenated after zero-padding their ranks. Every row keeps its own
position ids, so left padding never shifts a sequence. `step()` picks one token for every row, hands
out the deltas, drops finished rows (once enough have finished) and runs one forward for the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from generator.apply import PerSampleLora
from serve.results import log_batch_done

if TYPE_CHECKING:  # the engine imports this module; its types are named here for type checkers only
    from serve.engine import GenerationJob, LLMEngine, _Sequence
    from serve.results import Delta

logger = logging.getLogger(__name__)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` at the start of `dim` up to `length`."""
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [extra, 0]
    return F.pad(t, pad)


def _select(lora: PerSampleLora | None, idx: torch.Tensor) -> PerSampleLora | None:
    """Keep rows `idx` of per-sample factors `(L, batch, ...)`."""
    if lora is None:
        return None
    return PerSampleLora({m: t[:, idx] for m, t in lora.a.items()}, {m: t[:, idx] for m, t in lora.b.items()})


def can_merge(cache) -> bool:
    """Only plain full-attention dynamic layers (Llama-family decoders) are merged."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def merge_caches(a, b) -> None:
    """Append cache `b`'s rows to cache `a` in place; both left-padded to the longer one. Keys: (B, H, T, D)."""
    for la, lb in zip(a.layers, b.layers, strict=True):
        length = max(la.keys.shape[-2], lb.keys.shape[-2])
        la.keys = torch.cat([_left_pad(la.keys, length, 2), _left_pad(lb.keys, length, 2)], dim=0)
        la.values = torch.cat([_left_pad(la.values, length, 2), _left_pad(lb.values, length, 2)], dim=0)


def merge_lora(a: PerSampleLora | None, n_a: int, b: PerSampleLora | None, n_b: int) -> PerSampleLora | None:
    """Rows of `a` then rows of `b`; a side without factors (base-model rows) gets zeros, ranks are zero-padded."""
    if a is None and b is None:
        return None
    ref = a if a is not None else b
    out_a, out_b = {}, {}
    for m in sorted(set(a.a if a else {}) | set(b.a if b else {})):
        proto_a, proto_b = (ref.a.get(m) if ref else None), (ref.b.get(m) if ref else None)
        if proto_a is None:
            proto_a, proto_b = (b or a).a[m], (b or a).b[m]
        fa = [x.a[m] if x is not None and m in x.a else proto_a.new_zeros(proto_a.shape[0], n, 1, proto_a.shape[3])
              for x, n in ((a, n_a), (b, n_b))]  # (L, rows, R, d_in)
        fb = [x.b[m] if x is not None and m in x.b else proto_b.new_zeros(proto_b.shape[0], n, proto_b.shape[2], 1)
              for x, n in ((a, n_a), (b, n_b))]  # (L, rows, d_out, R)
        rank = max(t.shape[2] for t in fa)
        out_a[m] = torch.cat([F.pad(t, (0, 0, 0, rank - t.shape[2])) for t in fa], dim=1)
        out_b[m] = torch.cat([F.pad(t, (0, rank - t.shape[3])) for t in fb], dim=1)
    return PerSampleLora(out_a, out_b)


class DecodeBatch:
    """Sequences decoded together; `add` may be called between `step`s while `can_join`."""

    def __init__(self, engine: LLMEngine, detokenize: bool = True) -> None:
        self.engine, self.detokenize = engine, detokenize
        self.seqs: list[_Sequence] = []
        self.rows: list[int] = []  # sequence index of each batch row
        self.cache = self.mask = self.next_pos = self.logits = None
        self.lora: PerSampleLora | None = None
        self.can_join = True
        self.t0 = time.perf_counter()
        self.n_tokens = 0
        self.adapters: set[str] = set()

    @property
    def active(self) -> int:
        return sum(not self.seqs[j].finished for j in self.rows)

    @property
    def done(self) -> bool:
        return self.active == 0

    def add(self, jobs: Sequence[GenerationJob]) -> list[int]:
        """Prefill `jobs` and merge them into the batch; returns their sequence indices."""
        eng = self.engine
        if not self.can_join and self.rows:
            raise RuntimeError("this batch's cache type cannot be merged: wait until it is done")
        self._compact(force=True)
        if len(self.rows) + len(jobs) > eng.cfg.max_batch_size:
            raise ValueError(f"{len(self.rows)} + {len(jobs)} rows exceed max_batch_size={eng.cfg.max_batch_size}")
        seqs = [eng._new_sequence(j) for j in jobs]
        lora = eng._per_sample(jobs)
        cache, mask, next_pos, logits = eng._prefill(jobs, lora)
        first = len(self.seqs)
        self.seqs += seqs
        self.adapters |= {k for j in jobs for k, _ in j.adapters}
        if not self.rows:
            self.cache, self.mask, self.next_pos, self.logits, self.lora = cache, mask, next_pos, logits, lora
        else:
            merge_caches(self.cache, cache)
            length = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)], dim=0)
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.logits = torch.cat([self.logits, logits])
            self.lora = merge_lora(self.lora, len(self.rows), lora, len(jobs))
        self.can_join = can_merge(self.cache)
        self.rows += list(range(first, first + len(jobs)))
        return list(range(first, first + len(jobs)))

    def step(self) -> list[tuple[int, Delta]]:
        """One token for every live row: the deltas as (sequence index, delta), then the next forward."""
        eng = self.engine
        tokens = eng._choose(self.logits, [self.seqs[j] for j in self.rows])  # (rows,)
        chosen = tokens.tolist()  # one device sync per step
        out = []
        for r, j in enumerate(self.rows):
            if not self.seqs[j].finished:
                self.n_tokens += 1
                delta = eng._advance(self.seqs[j], chosen[r], self.detokenize)
                if delta is not None:  # None: a job that is not incremental, not finished yet
                    out.append((j, delta))
        before = list(self.rows)
        self._compact(force=False)
        if self.done:
            return out
        if self.rows != before:
            where = {j: r for r, j in enumerate(before)}
            tokens = tokens[torch.tensor([where[j] for j in self.rows], device=tokens.device)]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)  # (rows, T+1)
        self.logits = eng._forward(tokens[:, None], self.mask, self.next_pos[:, None], self.cache, self.lora)
        self.next_pos = self.next_pos + 1
        return out

    def _compact(self, force: bool) -> None:
        """Drop finished rows: always when `force`, else once `compact_fraction` of the rows are finished."""
        if not self.rows:
            return
        keep = [r for r, j in enumerate(self.rows) if not self.seqs[j].finished]
        if len(keep) == len(self.rows):
            return
        if not force and keep and len(keep) > (1.0 - self.engine.cfg.compact_fraction) * len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_pos, self.logits, self.lora = [], None, None, None, None, None
            return
        idx = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos, self.logits = self.mask[idx], self.next_pos[idx], self.logits[idx]
        self.lora = _select(self.lora, idx)
        self.rows = [self.rows[r] for r in keep]

    def release(self) -> None:
        """Nothing to give back: the batch's caches go with it (`SlotBatch` returns its KV slots here)."""

    def log_done(self) -> None:
        log_batch_done(self, "dynamic")
