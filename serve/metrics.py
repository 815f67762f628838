"""Latency histograms and counters: kept in-process (for /metrics and the benchmarks) and, inside a Ray
Serve replica, also exported through Ray's Prometheus pipeline (`ray.serve.metrics`).

Importing this module never imports Ray: the engine benchmark runs where Ray is not installed.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Seconds; wide enough for a 1 ms route and a 60 s CPU completion.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _in_ray_replica() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and "ray.serve" in sys.modules


def _tag_key(tags: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((tags or {}).items()))


@dataclass
class _Series:
    """One label set of a histogram: cumulative bucket counts, count and sum."""

    buckets: list[int]
    count: int = 0
    total: float = 0.0


@dataclass
class Histogram:
    name: str
    description: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    tag_keys: tuple[str, ...] = ()
    series: dict[tuple[tuple[str, str], ...], _Series] = field(default_factory=dict)
    _ray: Any = None

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        key = _tag_key(tags)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series([0] * len(self.buckets))
        for j in range(bisect.bisect_left(self.buckets, value), len(self.buckets)):
            s.buckets[j] += 1  # cumulative: every bucket whose bound is >= value
        s.count += 1
        s.total += value
        if self._ray is not None:
            self._ray.observe(value, tags=tags or {})


@dataclass
class Counter:
    name: str
    description: str
    tag_keys: tuple[str, ...] = ()
    series: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)
    _ray: Any = None

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        key = _tag_key(tags)
        self.series[key] = self.series.get(key, 0.0) + value
        if self._ray is not None:
            self._ray.inc(value, tags=tags or {})


class Registry:
    """The metrics of one process. `snapshot()` is plain data another process can merge and render."""

    def __init__(self) -> None:
        self._metrics: dict[str, Histogram | Counter] = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        # Ray pickles deployment classes by value, globals included: every process uses its own registry.
        return (process_registry, ())

    def histogram(self, name: str, description: str, buckets: tuple[float, ...] = LATENCY_BUCKETS,
                  tag_keys: tuple[str, ...] = ()) -> Histogram:
        with self._lock:
            if name not in self._metrics:
                self._metrics[name] = Histogram(name, description, buckets, tag_keys)
            m = self._metrics[name]
            if m._ray is None and _in_ray_replica():
                from ray.serve import metrics as ray_metrics

                m._ray = ray_metrics.Histogram(name, description=description, boundaries=list(buckets),
                                               tag_keys=tag_keys)
            return m

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...] = ()) -> Counter:
        with self._lock:
            if name not in self._metrics:
                self._metrics[name] = Counter(name, description, tag_keys)
            m = self._metrics[name]
            if m._ray is None and _in_ray_replica():
                from ray.serve import metrics as ray_metrics

                m._ray = ray_metrics.Counter(name, description=description, tag_keys=tag_keys)
            return m

    def snapshot(self) -> list[dict[str, Any]]:
        out = []
        for m in list(self._metrics.values()):
            if isinstance(m, Histogram):
                series = [{"tags": dict(k), "buckets": list(s.buckets), "count": s.count, "sum": s.total}
                          for k, s in m.series.items()]
                out.append({"kind": "histogram", "name": m.name, "description": m.description,
                            "le": list(m.buckets), "series": series})
            else:
                out.append({"kind": "counter", "name": m.name, "description": m.description,
                            "series": [{"tags": dict(k), "value": v} for k, v in m.series.items()]})
        return out


REGISTRY = Registry()


def process_registry() -> Registry:
    """This process's registry (what a pickled `Registry` turns into where it is unpickled)."""
    return REGISTRY


def _labels(tags: dict[str, str], extra: dict[str, str] | None = None) -> str:
    items = {**tags, **(extra or {})}
    if not items:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in sorted(items.items()))
    return "{" + body + "}"


def render_prometheus(snapshots: Iterable[tuple[str, list[dict[str, Any]]]]) -> str:
    """Prometheus text format for the snapshots of several processes, each labelled `component`."""
    by_name: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for component, snap in snapshots:
        for m in snap:
            by_name.setdefault(m["name"], []).append((component, m))
    lines = []
    for name, entries in sorted(by_name.items()):
        first = entries[0][1]
        lines.append(f"# HELP {name} {first['description']}")
        lines.append(f"# TYPE {name} {first['kind']}")
        for component, m in entries:
            for s in m["series"]:
                tags = {**s["tags"], "component": component}
                if m["kind"] == "counter":
                    lines.append(f"{name}_total{_labels(tags)} {s['value']:g}")
                    continue
                for le, c in zip(m["le"], s["buckets"], strict=True):
                    lines.append(f"{name}_bucket{_labels(tags, {'le': f'{le:g}'})} {c}")
                lines.append(f"{name}_bucket{_labels(tags, {'le': '+Inf'})} {s['count']}")
                lines.append(f"{name}_count{_labels(tags)} {s['count']}")
                lines.append(f"{name}_sum{_labels(tags)} {s['sum']:.6f}")
    return "\n".join(lines) + "\n"
