"""The bounds every adapter must keep to (`AdapterLimits`) and the error naming the one it breaks: plain data, no
torch, so a config holding them (serve.config.ServeConfig) is read without it. The checks are in generator/sanity.py."""

from __future__ import annotations

import math
from dataclasses import dataclass


class AdapterRejected(ValueError):
    """An adapter that is well-formed but not fit to serve; the message says which limit it breaks."""


@dataclass
class AdapterLimits:
    """Bounds every adapter must keep to before it is stored or served."""

    max_factor_abs: float = 1e3  # largest |entry| of any lora_A / lora_B factor (shipped generators: < 6)
    max_relative_update: float = 4.0  # largest ||scaling·B·A||_F / ||W||_F of any module in any layer

    def __post_init__(self) -> None:
        for name in ("max_factor_abs", "max_relative_update"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
