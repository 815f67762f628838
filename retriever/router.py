"""Routing inputs to adapters: embed (batched) -> search the FAISS index -> top-k adapters -> softmax weights.

The router abstains when the best cosine score is under `abstain_threshold`: the caller then uses the base
model or generates an adapter for the input. It re-syncs its index whenever the library's version changes,
whichever process changed it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from generator.encoder import check_texts
from retriever.config import RetrieverConfig
from retriever.index import build_index
from retriever.index_store import IndexStore, LoadedIndex
from retriever.keys import embed_text, keys_per_adapter
from retriever.library import AdapterLibrary

logger = logging.getLogger(__name__)


@dataclass
class Route:
    """One input's ranked adapters; `weights` sum to 1 (a softmax over `scores / temperature`)."""

    ids: list[str]
    names: list[str]
    scores: list[float]  # cosine similarity of the input to each adapter's best key
    weights: list[float]
    abstain: bool  # True when no adapter scores at least the abstain threshold (or the library is empty)
    raw_scores: list[float] | None = None  # with a projection: each adapter's cosine before it (`scores` are after)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["raw_scores"] is None:
            del d["raw_scores"]
        return d


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = (scores - scores.max()) / temperature
    e = np.exp(z)
    return e / e.sum()


class Router:
    """LoraRetriever-style retrieval over an `AdapterLibrary`."""

    def __init__(self, library: AdapterLibrary, encoder, cfg: RetrieverConfig | None = None,
                 background: bool = False, projection: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """With `background`, the first sync (embedding every adapter's keys when no saved index matches: a minute
        or more for a few hundred adapters on a CPU) runs in a thread, so a service can answer meanwhile; a route
        call waits for it. With `projection` (unit vectors `(n, dim)` -> unit vectors, e.g. a
        `retriever.projection.DescriptionProjection`), keys and queries are scored after it: the saved index holds
        the raw keys, and an exact in-memory index over the projected keys is made at each sync."""
        self.library, self.encoder, self.projection = library, encoder, projection
        self.cfg = cfg or RetrieverConfig()
        self.store = IndexStore(library.index_dir, encoder, self.cfg)
        self._lock = threading.Lock()
        self._loaded: LoadedIndex | None = None  # replaced whole on refresh, so a route sees one snapshot
        self._version: str | None = None
        self.last_timings: dict[str, float] = {}  # embed_ms, search_ms, total_ms of the latest route() call
        if background:
            threading.Thread(target=self._first_sync, name="router-index", daemon=True).start()
        else:
            self.refresh()

    def _first_sync(self) -> None:
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - the next route call syncs again and reports its error
            logger.exception("building the router's index in the background failed")

    def refresh(self) -> None:
        """Re-sync the index when the library changed since the last sync (cheap when it did not)."""
        version = self.library.version
        if version == self._version:
            return
        with self._lock:
            if version == self._version:
                return
            t0 = time.perf_counter()
            records = self.library.list()
            loaded = self.store.load_or_build(records)
            if self.projection is not None:
                vectors, labels = loaded.keys or self.store.read_keys(loaded.token)  # a fresh build has them
                loaded.index = build_index(self.projection(vectors), labels, self.cfg, "flat")
                loaded.raw_keys = dict(zip(labels.tolist(), vectors, strict=True))
            loaded.keys = None  # the vectors are in the index (and raw_keys); not held twice
            loaded.names = {r.id: r.name for r in records}
            self._loaded, self._version = loaded, version
            logger.info("router synced to library version %s: %d adapters, %s index %s in %.1f ms", version,
                        len(records), loaded.index.name, "rebuilt" if loaded.rebuilt else "loaded",
                        1e3 * (time.perf_counter() - t0))

    @property
    def index_type(self) -> str:
        return self._loaded.index.name if self._loaded else ""

    @property
    def n_adapters(self) -> int:
        return len(self._loaded.names) if self._loaded else 0

    def embed(self, inputs: Sequence[str]) -> np.ndarray:
        """inputs -> `(n, dim)` unit-norm query vectors, the configured prefix applied, one batched call."""
        texts = [embed_text(t, self.cfg.query_prefix) for t in check_texts(inputs, "input")]
        return self.encoder.encode(texts, what="input", batch_size=self.cfg.embed_batch_size).cpu().numpy()

    def route(self, inputs: Sequence[str], top_k: int | None = None) -> list[Route]:
        """Each input's top-k adapters with scores, softmax weights and the abstain signal."""
        t0 = time.perf_counter()
        k = self._check_k(top_k)
        self.refresh()
        queries = self.embed(inputs)
        t1 = time.perf_counter()
        routes = self.route_vectors(queries, k)
        t2 = time.perf_counter()
        self.last_timings = {"embed_ms": 1e3 * (t1 - t0), "search_ms": 1e3 * (t2 - t1), "total_ms": 1e3 * (t2 - t0)}
        logger.info("routed %d input(s), top-%d, in %.1f ms (embed %.1f, search %.2f); abstained on %d", len(routes),
                    k, self.last_timings["total_ms"], self.last_timings["embed_ms"], self.last_timings["search_ms"],
                    sum(r.abstain for r in routes))
        return routes

    def route_vectors(self, queries: np.ndarray, top_k: int,
                      exclude: Sequence[set[str]] | None = None) -> list[Route]:
        """Route already-embedded queries `(n, dim)`; `exclude[i]` holds adapter ids query i may not get."""
        loaded = self._loaded
        if loaded is None:
            raise RuntimeError("the router has no index: call refresh()")
        raw = queries
        if self.projection is not None:
            queries = self.projection(queries)
        n_excl = max((len(e) for e in exclude), default=0) if exclude else 0
        hits = min((top_k + n_excl) * keys_per_adapter(self.cfg), loaded.index.ntotal)
        scores, labels = loaded.index.search(queries, hits)  # (n, hits) each
        return [self._one(scores[i], labels[i], top_k, exclude[i] if exclude else set(), loaded, raw[i])
                for i in range(len(queries))]

    def _one(self, scores: np.ndarray, labels: np.ndarray, k: int, exclude: set[str], loaded: LoadedIndex,
             raw_query: np.ndarray) -> Route:
        ids, best, kept = [], [], []
        for s, lab in zip(scores.tolist(), labels.tolist(), strict=True):
            adapter_id = loaded.label_to_id.get(lab)
            if adapter_id is None or adapter_id in exclude or adapter_id in ids:
                continue  # -1 (no hit), an excluded adapter, or an adapter's second key
            ids.append(adapter_id)
            best.append(s)
            kept.append(lab)
            if len(ids) == k:
                break
        if not ids:
            return Route([], [], [], [], abstain=True)
        sc = np.array(best, np.float64)
        weights = softmax(sc, self.cfg.temperature)
        raw = [float(raw_query @ loaded.raw_keys[lab]) for lab in kept] if loaded.raw_keys is not None else None
        return Route(ids, [loaded.names.get(i, "") for i in ids], [float(s) for s in sc], [float(w) for w in weights],
                     abstain=bool(sc[0] < self.cfg.abstain_threshold), raw_scores=raw)

    def _check_k(self, top_k: int | None) -> int:
        k = self.cfg.top_k if top_k is None else top_k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
            raise ValueError(f"top_k={top_k!r} is not allowed: give an integer from 1 to 64")
        return k
