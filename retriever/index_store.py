"""The router's index, saved with the library and verified against it on open.

Each build is a content-addressed directory `index/<token>/` (token: hash of the settings and the sorted
adapter ids) holding `index.faiss` (FAISS `write_index`), `keys.safetensors` (the key vectors and labels)
and `index.json` (settings, ids, labels). A directory is written under a temp name and renamed into place,
so readers in other processes only ever see complete builds. Opening with the same adapters and settings
reads the saved index; otherwise the index is rebuilt, re-embedding only the keys of adapters it has not
seen: key vectors are cached by a digest of the texts they average, so a key is embedded once, whatever
adapter id it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from retriever.config import RetrieverConfig
from retriever.fsutil import fsync_tree
from retriever.index import INDEX_TYPES, VectorIndex, build_index, choose_index_type
from retriever.keys import KINDS, LABELS_FORMAT, assign_labels, embed_keys, keys_per_adapter
from retriever.records import AdapterRecord
from retriever.shipped_keys import shipped_keys

logger = logging.getLogger(__name__)
INDEX_FILE, KEYS_FILE, META_FILE = "index.faiss", "keys.safetensors", "index.json"
KEEP_BUILDS = 3  # older build directories are pruned, per key signature (the routers sharing a library's index
#                 directory, e.g. the service's Router and the description strategy's two, keep each other's builds)


@dataclass
class LoadedIndex:
    index: VectorIndex
    label_to_id: dict[int, str]  # key label -> adapter id
    token: str
    rebuilt: bool  # False when read from disk
    names: dict[str, str] = field(default_factory=dict)  # adapter id -> name, filled by the router
    raw_keys: dict[int, np.ndarray] | None = None  # key label -> raw key vector, kept by a router with a projection
    keys: tuple[np.ndarray, np.ndarray] | None = None  # a fresh build's key vectors and labels (None when read)


def key_signature(encoder_name: str, dim: int, cfg: RetrieverConfig) -> dict:
    """Everything the key vectors depend on."""
    return {"embedder": encoder_name, "dim": dim, "key_mode": cfg.key_mode, "key_descriptions": cfg.key_descriptions,
            "key_samples": cfg.key_samples, "query_prefix": cfg.query_prefix, "labels": LABELS_FORMAT}


def index_signature(kind: str, cfg: RetrieverConfig) -> dict:
    """Everything the built index depends on besides the keys (search-time knobs are applied on load)."""
    sig: dict = {"type": kind}
    if kind == "hnsw":
        sig |= {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction}
    if kind == "ivf":
        sig |= {"nlist": cfg.ivf_nlist}
    return sig


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


class IndexStore:
    """Loads or builds the index for a set of adapter records, under `index_dir`."""

    def __init__(self, index_dir: Path, encoder, cfg: RetrieverConfig) -> None:
        self.dir, self.encoder, self.cfg = Path(index_dir), encoder, cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keys_sig = key_signature(encoder.name, encoder.dim, cfg)

    def load_or_build(self, records: Sequence[AdapterRecord]) -> LoadedIndex:
        records = sorted(records, key=lambda r: r.id)
        labels = assign_labels([r.id for r in records])
        kind = choose_index_type(len(records) * keys_per_adapter(self.cfg), self.cfg)
        meta = {"keys": self.keys_sig, "index": index_signature(kind, self.cfg), "ids": [r.id for r in records]}
        token = _digest(meta)
        label_to_id = {}
        for r in records:
            label_to_id.update({labels[r.id] + kind: r.id for kind in range(KINDS)})
        loaded = self._read(token, meta, kind)
        if loaded is not None:
            return LoadedIndex(loaded, label_to_id, token, rebuilt=False)
        t0 = time.perf_counter()
        vectors, key_labels, digests = self._keys(records, labels)
        index = build_index(vectors, key_labels, self.cfg, kind)
        self._write(token, meta, index, vectors, key_labels, digests)
        logger.info("rebuilt the %s index over %d adapters (%d keys) in %.1f ms", kind, len(records), len(key_labels),
                    1e3 * (time.perf_counter() - t0))
        return LoadedIndex(index, label_to_id, token, rebuilt=True, keys=(vectors, key_labels))

    # -- reading
    def _read(self, token: str, meta: dict, kind: str) -> VectorIndex | None:
        d = self.dir / token
        if not d.is_dir():
            return None
        try:
            stored = json.loads((d / META_FILE).read_text())
            if {k: stored.get(k) for k in meta} != meta:
                raise ValueError("settings or adapter ids differ")
            index = INDEX_TYPES[kind].load(d / INDEX_FILE, self.encoder.dim, self.cfg)
            if sorted(index.labels().tolist()) != sorted(stored["labels"]):
                raise ValueError("the FAISS index's labels differ from index.json")
            return index
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
            logger.warning("index build %s does not match the library (%s); rebuilding", token, e)
            return None

    def read_keys(self, token: str) -> tuple[np.ndarray, np.ndarray]:
        """A saved build's key vectors `(n_keys, dim)` and their labels `(n_keys,)`."""
        tensors = load_file(str(self.dir / token / KEYS_FILE))
        return tensors["vectors"].numpy(), tensors["labels"].numpy()

    def cached_keys(self) -> dict[str, np.ndarray]:
        """key digest -> vector, from the shipped default keys and every saved build made with the same embedder."""
        cache: dict[str, np.ndarray] = shipped_keys(self.keys_sig["embedder"], self.keys_sig["dim"])
        for d in reversed(self._builds()):  # oldest first, so newer builds win
            try:
                meta = json.loads((d / META_FILE).read_text())
                if any(meta["keys"][k] != self.keys_sig[k] for k in ("embedder", "dim")):
                    continue  # digests cover the texts (prefix included); the vectors depend on the embedder
                vectors = load_file(str(d / KEYS_FILE))["vectors"].numpy()
                cache.update(zip(meta["digests"], vectors, strict=True))
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                continue
        return cache

    def _keys(self, records: Sequence[AdapterRecord], labels: dict[str, int]):
        cache = self.cached_keys()
        vectors, key_labels, digests = embed_keys(records, self.encoder, self.cfg, labels, cache)
        fresh = sum(d not in cache for d in digests)
        if fresh:
            logger.info("embedded %d new key(s); %d reused from earlier builds", fresh, len(digests) - fresh)
        return vectors, key_labels, digests

    # -- writing
    def _write(self, token: str, meta: dict, index: VectorIndex, vectors: np.ndarray, labels: np.ndarray,
               digests: list[str]) -> None:
        final = self.dir / token
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            index.save(tmp / INDEX_FILE)
            save_file({"vectors": torch.from_numpy(vectors).contiguous(), "labels": torch.from_numpy(labels)},
                      str(tmp / KEYS_FILE))
            (tmp / META_FILE).write_text(json.dumps({**meta, "labels": labels.tolist(), "digests": digests}))
            fsync_tree(tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # another process published the same build first: theirs is identical
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune(keep=token)

    def _builds(self) -> list[Path]:
        """Build directories, newest first."""
        dirs = [d for d in self.dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return sorted(dirs, key=lambda d: d.stat().st_mtime_ns, reverse=True)

    def _prune(self, keep: str) -> None:
        """Keep the newest KEEP_BUILDS builds of each key signature: a router with other key settings over the same
        library must not evict this one's cached keys (it would re-embed the whole library at its next change)."""
        kept: dict[str, int] = {}
        for d in self._builds():
            group = _keys_group(d)
            kept[group] = kept.get(group, 0) + 1
            if d.name != keep and (group == "" or kept[group] > KEEP_BUILDS):
                shutil.rmtree(d, ignore_errors=True)
        for d in self.dir.glob(".tmp-*"):  # temp dirs of crashed builds, if old
            if time.time() - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)


def _keys_group(build: Path) -> str:
    """The key signature of a saved build ("" when its index.json is unreadable: such a build is pruned)."""
    try:
        return _digest(json.loads((build / META_FILE).read_text())["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
