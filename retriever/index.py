"""FAISS indexes over unit vectors (cosine = inner product), behind one interface, chosen by name.

Every index is wrapped in `IndexIDMap2`, so search returns the caller's int64 labels, which stay the same
across rebuilds. `flat` is exact; `hnsw` and `ivf` are approximate and meant for large libraries.
"""

from __future__ import annotations

import logging
import math
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

import faiss
import numpy as np

from generator.registry import registrar
from retriever.config import RetrieverConfig

logger = logging.getLogger(__name__)
INDEX_TYPES: dict[str, type[VectorIndex]] = {}


register_index = registrar(INDEX_TYPES)


def _as_matrix(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must be (n, {dim}), got {x.shape}")
    return x


class VectorIndex(ABC):
    """Inner-product search over labelled vectors; `build` once, `search` many times."""

    name = ""

    def __init__(self, dim: int, cfg: RetrieverConfig) -> None:
        self.dim, self.cfg = dim, cfg
        self.faiss_index: faiss.IndexIDMap2 | None = None

    @abstractmethod
    def _make(self, vectors: np.ndarray) -> faiss.Index:
        """The inner index for `vectors` `(n, dim)`, trained if it needs training, still empty."""

    def _tune(self, inner: faiss.Index) -> None:  # noqa: B027 - optional hook, a no-op for exact search
        """Apply search-time parameters (after build or load)."""

    def build(self, vectors: np.ndarray, labels: np.ndarray) -> VectorIndex:
        vectors = _as_matrix(vectors, self.dim, "vectors")  # (n, dim)
        labels = np.ascontiguousarray(labels, dtype=np.int64)  # (n,)
        if labels.shape != (len(vectors),):
            raise ValueError(f"{len(vectors)} vectors but labels of shape {labels.shape}")
        if len(np.unique(labels)) != len(labels):
            raise ValueError("labels must be unique")
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # building uses every core (the setting is per thread)
        inner = self._make(vectors)
        self._tune(inner)
        index = faiss.IndexIDMap2(inner)
        if len(vectors):
            index.add_with_ids(vectors, labels)
        self.faiss_index = index
        ms = 1e3 * (time.perf_counter() - t0)
        logger.info("built %s index over %d vectors in %.1f ms", self.name, len(vectors), ms)
        return self

    def retune(self, cfg: RetrieverConfig) -> None:
        """Apply another config's search-time parameters (efSearch, nprobe) without rebuilding."""
        self.cfg = cfg
        if self.faiss_index is not None:
            self._tune(faiss.downcast_index(self.faiss_index.index))

    @property
    def ntotal(self) -> int:
        return 0 if self.faiss_index is None else int(self.faiss_index.ntotal)

    def labels(self) -> np.ndarray:
        if self.faiss_index is None:
            return np.zeros(0, dtype=np.int64)
        return faiss.vector_to_array(self.faiss_index.id_map).astype(np.int64)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries `(q, dim)` -> scores `(q, k)` and labels `(q, k)`, best first; missing hits have label -1."""
        queries = _as_matrix(queries, self.dim, "queries")
        if self.faiss_index is None or self.ntotal == 0 or k < 1:
            return np.full((len(queries), max(k, 0)), -np.inf, np.float32), np.full((len(queries), max(k, 0)), -1)
        faiss.omp_set_num_threads(self.cfg.search_threads or os.cpu_count() or 1)
        scores, labels = self.faiss_index.search(queries, k)
        return scores, labels

    def save(self, path: Path) -> None:
        if self.faiss_index is None:
            raise ValueError("nothing to save: build the index first")
        faiss.write_index(self.faiss_index, str(path))

    @classmethod
    def load(cls, path: Path, dim: int, cfg: RetrieverConfig) -> VectorIndex:
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{path.name} does not hold an IndexIDMap2")
        if index.d != dim:
            raise ValueError(f"{path.name} holds {index.d}-d vectors, expected {dim}")
        self = cls(dim, cfg)
        self._tune(faiss.downcast_index(index.index))
        self.faiss_index = index
        return self


@register_index("flat")
class FlatIndex(VectorIndex):
    """Exact search: every key is scored. Best below ~1e5 keys."""

    def _make(self, vectors):
        return faiss.IndexFlatIP(self.dim)


@register_index("hnsw")
class HNSWIndex(VectorIndex):
    """Hierarchical navigable small-world graph: log-time search, no training, slow-ish to build."""

    def _make(self, vectors):
        inner = faiss.IndexHNSWFlat(self.dim, self.cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.cfg.hnsw_ef_construction
        return inner

    def _tune(self, inner):
        inner.hnsw.efSearch = self.cfg.hnsw_ef_search

    def search(self, queries, k):
        if self.faiss_index is not None and k > self.cfg.hnsw_ef_search:
            faiss.downcast_index(self.faiss_index.index).hnsw.efSearch = k  # the beam must hold k results
        try:
            return super().search(queries, k)
        finally:
            if self.faiss_index is not None:
                self._tune(faiss.downcast_index(self.faiss_index.index))


def ivf_nlist(n: int, cfg: RetrieverConfig) -> int:
    """IVF cell count: the configured one, or 2*sqrt(n); at most n/39 so k-means has enough points per cell."""
    nlist = cfg.ivf_nlist or int(2 * math.sqrt(max(n, 1)))
    return max(1, min(nlist, n // 39 if n >= 39 else 1))


@register_index("ivf")
class IVFIndex(VectorIndex):
    """Inverted file: k-means cells, `nprobe` of them scanned per query. Fast to build at 1e6 keys."""

    def _make(self, vectors):
        nlist = ivf_nlist(len(vectors), self.cfg)
        quantizer = faiss.IndexFlatIP(self.dim)
        inner = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        inner.cp.max_points_per_centroid = 32  # k-means on a sample of 32 points a cell and 10 rounds:
        inner.cp.niter = 10  # enough for routing, and minutes faster at 1e6 keys
        if len(vectors):
            inner.train(vectors)
        return inner  # faiss's Python wrapper keeps `quantizer` alive as long as `inner`

    def _tune(self, inner):
        inner.nprobe = self.cfg.ivf_nprobe


def choose_index_type(n_keys: int, cfg: RetrieverConfig) -> str:
    """The index type `cfg` asks for at this size (`auto`: flat below `switch_threshold`)."""
    if cfg.index != "auto":
        return cfg.index
    return "flat" if n_keys < cfg.switch_threshold else cfg.approximate


def build_index(vectors: np.ndarray, labels: np.ndarray, cfg: RetrieverConfig, kind: str | None = None) -> VectorIndex:
    kind = kind or choose_index_type(len(vectors), cfg)
    if kind not in INDEX_TYPES:
        raise ValueError(f"unknown index type {kind!r}; registered: {sorted(INDEX_TYPES)}")
    if kind == "ivf" and len(vectors) == 0:
        kind = "flat"  # an IVF index cannot be trained on nothing
    return INDEX_TYPES[kind](vectors.shape[1] if vectors.ndim == 2 else 0, cfg).build(vectors, labels)
