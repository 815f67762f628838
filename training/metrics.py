"""ROUGE-L (the `rouge-score` package) and exact match, each the max over a task's accepted answers."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 100], the best over `references`."""
    return 100.0 * max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _normalise(s: str) -> str:
    s = s.lower().strip()
    s = "".join(ch for ch in s if ch not in string.punctuation)
    return re.sub(r"\s+", " ", s).strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the prediction equals any reference after lower-casing and dropping punctuation, else 0."""
    p = _normalise(prediction)
    return 100.0 * any(p == _normalise(r) for r in references)
