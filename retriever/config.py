"""The retriever component's one config: how adapters are keyed, indexed, searched and weighted."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

IndexType = Literal["auto", "flat", "hnsw", "ivf"]
KeyMode = Literal["inputs_else_description", "both", "description", "inputs", "instruction"]
_INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
_KEY_MODES = ("inputs_else_description", "both", "description", "inputs", "instruction")


@dataclass
class RetrieverConfig:
    """Everything the router needs besides the library and the encoder."""

    # -- the FAISS index
    index: IndexType = "auto"  # flat (exact), hnsw or ivf (approximate), or auto: flat below switch_threshold keys
    approximate: Literal["hnsw", "ivf"] = "hnsw"  # the approximate index `auto` switches to
    switch_threshold: int = 20_000  # adapters x keys per adapter from which `auto` goes approximate (>= 1)
    hnsw_m: int = 32  # HNSW graph degree (4..128)
    hnsw_ef_construction: int = 40  # HNSW build-time beam width (>= hnsw_m)
    hnsw_ef_search: int = 64  # HNSW search-time beam width (>= 1; raised to k when smaller)
    ivf_nlist: int | None = None  # IVF cells; None: 2 * sqrt(n_keys), clipped to [1, n_keys // 39]
    ivf_nprobe: int = 16  # IVF cells visited per query (>= 1)
    search_threads: int = 1  # OpenMP threads of a search call, set per calling thread (0: all cores); on a few
    #                          shared cores one thread answers a small batch fastest (see results/bench_route.json)
    # -- adapter keys (LoraRetriever: the mean embedding of a few of the adapter's inputs)
    key_mode: KeyMode = "inputs_else_description"  # which keys an adapter gets (see keys.py); "instruction": only
    #                                               adapters with an instruction, keyed by it (the strategy uses it)
    key_descriptions: int = 8  # at most this many descriptions are averaged into the description key (>= 1)
    key_samples: int = 20  # at most this many sample inputs are averaged into the inputs key (>= 1)
    # -- routing
    top_k: int = 3  # adapters returned per input (1..64)
    temperature: float = 0.05  # softmax temperature over cosine scores for the mixture weights (> 0)
    abstain_threshold: float = 0.25  # abstain when the best cosine score is below this ([-1, 1])
    query_prefix: str = ""  # instruction prepended to queries and sample inputs before embedding
    embed_batch_size: int = 64  # embedder batch size (>= 1)

    def __post_init__(self) -> None:
        problems = []
        if self.index not in _INDEX_TYPES:
            problems.append(f"index={self.index!r} (allowed: {list(_INDEX_TYPES)})")
        if self.approximate not in ("hnsw", "ivf"):
            problems.append(f"approximate={self.approximate!r} (allowed: ['hnsw', 'ivf'])")
        if self.key_mode not in _KEY_MODES:
            problems.append(f"key_mode={self.key_mode!r} (allowed: {list(_KEY_MODES)})")
        problems += _check_ints(self)
        t = self.temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            problems.append(f"temperature={self.temperature!r} (must be a finite number > 0)")
        if not (isinstance(self.abstain_threshold, (int, float)) and -1.0 <= self.abstain_threshold <= 1.0):
            problems.append(f"abstain_threshold={self.abstain_threshold!r} (must be a cosine score in [-1, 1])")
        if not isinstance(self.query_prefix, str) or len(self.query_prefix) > 500:
            problems.append("query_prefix must be a string of at most 500 characters")
        if problems:
            raise ValueError("invalid RetrieverConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrieverConfig:
        return from_known_fields(cls, d)


def from_known_fields(cls, d: dict[str, Any]):
    """`cls(**d)` for a config dataclass, refusing keys it has no field for (naming them and the allowed ones)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**d)


# field -> (minimum, maximum or None)
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "switch_threshold": (1, None),
    "hnsw_m": (4, 128),
    "hnsw_ef_construction": (4, None),
    "hnsw_ef_search": (1, None),
    "ivf_nprobe": (1, None),
    "search_threads": (0, None),
    "key_descriptions": (1, None),
    "key_samples": (1, None),
    "top_k": (1, 64),
    "embed_batch_size": (1, None),
}


def _check_ints(cfg: RetrieverConfig) -> list[str]:
    problems = []
    for name, (lo, hi) in _INT_RANGES.items():
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            problems.append(f"{name}={v!r} (must be an integer {allowed})")
    if cfg.ivf_nlist is not None and (not isinstance(cfg.ivf_nlist, int) or cfg.ivf_nlist < 1):
        problems.append(f"ivf_nlist={cfg.ivf_nlist!r} (must be None or an integer >= 1)")
    efc, m = cfg.hnsw_ef_construction, cfg.hnsw_m
    if isinstance(efc, int) and isinstance(m, int) and efc < m:
        problems.append(f"hnsw_ef_construction={cfg.hnsw_ef_construction} must be >= hnsw_m={cfg.hnsw_m}")
    return problems
