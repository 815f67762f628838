"""`StrategyConfig`, how POST /v1/adapters picks between the library and the hypernetwork: plain data, no torch or
FAISS, so the service's config (serve.config.ServeConfig) validates it anywhere. retriever/strategy.py, which
applies it, re-exports it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from retriever.config import RetrieverConfig, from_known_fields

StrategyName = Literal["generate", "retrieve", "auto"]
OVERRIDABLE = ("match_threshold", "match_margin", "near_threshold", "instruction_threshold", "scope_threshold")
STRATEGY_NAMES: tuple[str, ...] = ("generate", "retrieve", "auto")


@dataclass
class StrategyConfig:
    """How a description picks its adapter; thresholds left None come from the calibration file."""

    strategy: StrategyName = "auto"  # the default when a request names none
    calibration: str | None = None  # calibration JSON; None: the shipped retriever/data/strategy_calibration.json
    train_tasks: str | None = None  # train-task embeddings (safetensors); None: the shipped one
    top_k: int = 3  # library tasks reported (and at most mixed) per description (1..16)
    key_descriptions: int = 32  # a library adapter's description key averages at most this many of its descriptions
    #   (>= 1; the calibration was fitted with the same number: it printed expected ROUGE-L 29.77 with 8, 30.58 with
    #   32, 30.76 with 64, and library records hold at most 32)
    mix_generated_weight: float = 0.5  # the generated adapter's share of a mixture ((0, 1))
    temperature: float = 0.05  # softmax temperature over the mixed library adapters' scores (> 0)
    reject_below: float | None = None  # refuse (HTTP 422) out-of-scope descriptions whose confidence is under this
    #                                    ([0, 1]); None: never refuse, only warn
    # overrides of the calibrated values (cosine scores in [-1, 1]; None: calibrated)
    match_threshold: float | None = None  # one library task's score from which auto returns its adapter
    match_margin: float | None = None  # ... when it leads the second task by at least this much
    near_threshold: float | None = None  # library tasks from this score are mixed with the generated adapter
    instruction_threshold: float | None = None  # a library adapter's instruction restated from this score: its adapter
    scope_threshold: float | None = None  # nearer than this to no train task and no library task: out of scope

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGY_NAMES:
            problems.append(f"strategy={self.strategy!r} (allowed: {list(STRATEGY_NAMES)})")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= 16:
            problems.append(f"top_k={self.top_k!r} (must be an integer in [1, 16])")
        if not isinstance(self.key_descriptions, int) or isinstance(self.key_descriptions, bool) or \
                self.key_descriptions < 1:
            problems.append(f"key_descriptions={self.key_descriptions!r} (must be an integer >= 1)")
        if not _number(self.mix_generated_weight) or not 0.0 < self.mix_generated_weight < 1.0:
            problems.append(f"mix_generated_weight={self.mix_generated_weight!r} (must be in (0, 1))")
        if not _number(self.temperature) or self.temperature <= 0:
            problems.append(f"temperature={self.temperature!r} (must be a finite number > 0)")
        if self.reject_below is not None and (not _number(self.reject_below) or not 0 <= self.reject_below <= 1):
            problems.append(f"reject_below={self.reject_below!r} (must be None or in [0, 1])")
        for name in OVERRIDABLE:
            v = getattr(self, name)
            if v is not None and (not _number(v) or not -1.0 <= v <= 1.0):
                problems.append(f"{name}={v!r} (must be None or a cosine score in [-1, 1])")
        if problems:
            raise ValueError("invalid StrategyConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StrategyConfig:
        return from_known_fields(cls, d)


def key_configs(base: RetrieverConfig, key_descriptions: int) -> tuple[RetrieverConfig, RetrieverConfig]:
    """The key settings of the description strategy's two routers over a library: by descriptions (their mean, at
    most `key_descriptions` of them) and by instructions; descriptions are embedded without the query prefix."""
    return (replace(base, key_mode="description", query_prefix="", key_descriptions=key_descriptions),
            replace(base, key_mode="instruction", query_prefix=""))


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
