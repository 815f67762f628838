"""A learned linear map of description embeddings that sets apart tasks the embedder finds alike.

The description strategy asks of a description: is this a paraphrase of a library task, or a different task that
merely reads alike (another question about the same kind of text)? Raw MiniLM cosines separate the two only so
far. `DescriptionProjection` is a `(dim, dim)` matrix `W`, fitted on train tasks' paraphrases with a softmax over
their description keys (a paraphrase should score its own task above every other), kept near the identity. Both a
description and a library adapter's description key go through `unit(x @ W)` before the cosine. Because a key is
a mean of unit vectors, `unit(unit(mean) @ W) = unit(mean @ W)`: the raw keys the index store saves and caches
project exactly, with no re-embedding.

`hyperlora train strategy` fits it (retriever/calibrate.py) and writes it next to the calibration file, which
names it; the thresholds are fitted on projected scores, with the projection fitted on half the source datasets and
the tasks the library lacks drawn from the other half, as a new task would be.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file


@dataclass
class ProjectionConfig:
    """How the projection is fitted (`steps` 0: no projection, raw cosines)."""

    steps: int = 400  # Adam steps (>= 0)
    lr: float = 1e-2  # Adam learning rate (> 0)
    temperature: float = 0.05  # softmax temperature over a paraphrase's scores to the task keys (> 0)
    identity_weight: float = 1e-3  # weight of ||W - I||^2, which keeps W near the identity (>= 0)
    batch: int = 2048  # paraphrases per step (>= 1)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)!r} (must be > 0)" for k in ("lr", "temperature", "batch")
                    if not getattr(self, k) > 0]
        problems += [f"{k}={getattr(self, k)!r} (must be >= 0)" for k in ("steps", "identity_weight")
                     if not getattr(self, k) >= 0]
        if problems:
            raise ValueError("invalid ProjectionConfig: " + "; ".join(problems))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class DescriptionProjection:
    """`unit(x @ W)` for unit embeddings `x` `(n, dim)`."""

    def __init__(self, matrix: np.ndarray, embedder: str = "") -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a description projection is a square matrix, got shape {matrix.shape}")
        self.matrix = np.ascontiguousarray(matrix, np.float32)
        self.embedder = embedder

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"the description projection takes (n, {self.dim}) vectors, got {x.shape}")
        return np.ascontiguousarray(unit(x @ self.matrix), np.float32)

    def save(self, path: str | Path, config: ProjectionConfig | None = None) -> Path:
        path = Path(path)
        meta = {"embedder": self.embedder, "config": json.dumps(asdict(config) if config else {})}
        save_file({"matrix": self.matrix}, str(path), metadata=meta)
        path.chmod(0o644)  # safetensors writes 0600; the shipped one is package data
        return path

    @classmethod
    def load(cls, path: str | Path) -> DescriptionProjection:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        return cls(load_file(str(path))["matrix"], meta.get("embedder", ""))


def fit_projection(keys: np.ndarray, queries: np.ndarray, owner: np.ndarray, cfg: ProjectionConfig,
                   embedder: str = "") -> DescriptionProjection:
    """Fit `W` so that each paraphrase `queries[i]` scores its task's key `keys[owner[i]]` above every other key.
    `keys` `(n_tasks, dim)`, `queries` `(n, dim)` (unit rows); `owner` `(n,)` indexes `keys`."""
    if len(queries) != len(owner) or not len(queries) or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"fit_projection needs (n, d) queries with n owners and (t, d) keys: got {queries.shape}, "
                         f"{np.shape(owner)}, {keys.shape}")
    g = torch.Generator().manual_seed(cfg.seed)
    dim = keys.shape[1]
    eye = torch.eye(dim)
    w = eye.clone().requires_grad_(True)
    k, q = torch.from_numpy(np.asarray(keys, np.float32)), torch.from_numpy(np.asarray(queries, np.float32))
    labels = torch.from_numpy(np.asarray(owner, np.int64))
    opt = torch.optim.Adam([w], lr=cfg.lr)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(q), (min(cfg.batch, len(q)),), generator=g)
        kp = torch.nn.functional.normalize(k @ w, dim=-1)
        qp = torch.nn.functional.normalize(q[idx] @ w, dim=-1)
        loss = torch.nn.functional.cross_entropy(qp @ kp.T / cfg.temperature, labels[idx])
        loss = loss + cfg.identity_weight * ((w - eye) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return DescriptionProjection(w.detach().numpy(), embedder)


def source_folds(sources: Sequence[object], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the task indices that share no source dataset (tasks are grouped by `sources[i]`, any
    hashable; the groups are shuffled with `seed` and dealt out until the first half holds half the tasks)."""
    groups: dict[object, list[int]] = {}
    for i, s in enumerate(sources):
        groups.setdefault(s, []).append(i)
    order = np.random.default_rng(seed).permutation(len(groups))
    members = list(groups.values())
    first: list[int] = []
    for g in order:
        if len(first) >= len(sources) / 2:
            break
        first += members[g]
    second = sorted(set(range(len(sources))) - set(first))
    return np.array(sorted(first), np.int64), np.array(second, np.int64)
