"""Registries of variant classes: one decorator factory for every "chosen by name" family."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], attr: str = "name") -> Callable[[str], Callable[[T], T]]:
    """`register = registrar(TABLE)`; then `@register("x")` puts a class in TABLE under "x" and sets `cls.<attr>`."""

    def register(key: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            table[key] = cls
            setattr(cls, attr, key)
            return cls

        return deco

    return register
