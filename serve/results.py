"""What a decode step hands out per sequence: plain dataclasses shared by the engine and its batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
