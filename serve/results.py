"""What a decode step hands out per sequence: plain dataclasses shared by the engine and its batches."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("serve.engine")


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float]


@dataclass
class Delta:
    """What one decode step added to one sequence; finish_reason "error" ends it alone, `error` says why."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "error"] | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


def log_batch_done(batch: Any, path: str) -> None:
    """Metrics and the log line of a finished decode batch (`DecodeBatch` or `SlotBatch`; `path` names which)."""
    dt = time.perf_counter() - batch.t0
    eng = batch.engine
    eng._batch_s.observe(dt)
    eng._batch_size.observe(len(batch.seqs))
    eng._tokens.inc(batch.n_tokens)
    logger.info("generated %d tokens for %d sequences (%d distinct adapters) in %.1f ms (%.0f tokens/s, %s)",
                batch.n_tokens, len(batch.seqs), len(batch.adapters), 1e3 * dt, batch.n_tokens / max(dt, 1e-9), path)
