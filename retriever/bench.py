"""`hyperlora bench route`: FAISS search latency and recall at 1e3..1e6 keys, and end-to-end route latency.

Keys are synthetic unit vectors of the embedder's width, drawn around n/100 random centres (sentence
embeddings of adapters cluster by task family; uniform random vectors would be the worst case for any
approximate index). Queries are fresh draws from the same mixture. Recall@10 is measured against exact
(flat) search. Latency is per single-query call, the way a request arrives.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from retriever.config import RetrieverConfig
from retriever.index import build_index

NOISE = 0.05  # per-dimension noise around a centre: within-cluster cosine ~0.5 at 384 dims


def synthetic(n: int, centers: np.ndarray, seed: int, chunk: int = 100_000) -> np.ndarray:
    """`(n, dim)` float32 unit vectors around `centers`, built in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, centers.shape[1]), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centers[rng.integers(0, len(centers), e - s)] + NOISE * rng.standard_normal((e - s, centers.shape[1]),
                                                                                        dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _centers(n: int, dim: int, seed: int) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((max(10, n // 100), dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _pcts(ms: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4)}


# search-time settings measured on one build of each approximate index (no rebuild needed)
SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {"hnsw": ("hnsw_ef_search", (64, 128, 256)),
                                                   "ivf": ("ivf_nprobe", (16, 32, 64))}


def _measure(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Single-query searches: labels `(n_queries, k)` and the latency of each call in ms."""
    found, ms = [], []
    for i in range(len(queries)):
        t = time.perf_counter()
        _, lab = index.search(queries[i: i + 1], k)
        ms.append(1e3 * (time.perf_counter() - t))
        found.append(lab[0])
    return np.stack(found), ms


def bench_size(n: int, kinds: Sequence[str], dim: int, n_queries: int, k: int, cfg: RetrieverConfig) -> list[dict]:
    centers = _centers(n, dim, seed=n)
    keys, queries = synthetic(n, centers, seed=1), synthetic(n_queries, centers, seed=2)
    labels = np.arange(n, dtype=np.int64)
    exact = build_index(keys, labels, cfg, "flat").search(queries, k)[1]  # ground truth, one batched call
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        index = build_index(keys, labels, cfg, kind)
        build_s = time.perf_counter() - t0
        field, values = SWEEPS.get(kind, ("", (None,)))
        for v in values:
            if field:
                index.retune(replace(cfg, **{field: v}))
            found, ms = _measure(index, queries, k)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))
            rows.append({"n_keys": n, "index": kind, "build_s": round(build_s, 2), **_pcts(ms),
                         f"recall@{k}": round(recall, 4), "params": _params(kind, n, index.cfg)})
        del index
        gc.collect()
    return rows


def _params(kind: str, n: int, cfg: RetrieverConfig) -> dict:
    from retriever.index import ivf_nlist

    if kind == "hnsw":
        return {"M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction, "efSearch": cfg.hnsw_ef_search}
    if kind == "ivf":
        return {"nlist": ivf_nlist(n, cfg), "nprobe": cfg.ivf_nprobe}
    return {}


def bench_end_to_end(encoder, cfg: RetrieverConfig, reps: int = 30, batch: int = 32) -> dict:
    """Route latency with embedding over a library of the default tasks (tiny stand-in adapters)."""
    import torch

    from generator.lora import LoraAdapter
    from retriever.library import AdapterLibrary
    from retriever.router import Router
    from retriever.tasks import load_default_tasks

    tasks = load_default_tasks()
    with tempfile.TemporaryDirectory() as tmp:
        lib = AdapterLibrary(Path(tmp) / "lib")
        for t in tqdm(tasks, desc="bench library"):
            ad = LoraAdapter("bench", 1, 1.0, {"q_proj": torch.zeros(1, 1, 8)}, {"q_proj": torch.zeros(1, 8, 1)})
            lib.add(ad, t["name"], t["descriptions"], "generated", t["sample_inputs"])
        t0 = time.perf_counter()
        router = Router(lib, encoder, cfg)
        index_s = time.perf_counter() - t0
        inputs = [t["sample_inputs"][-1] for t in tasks]
        out = {"library_adapters": len(tasks), "index": router.index_type, "index_build_s": round(index_s, 2)}
        for bs in (1, batch):
            router.route(inputs[:bs])  # warm-up
            totals, embeds, searches = [], [], []
            for r in range(reps):
                chunk = [inputs[(r * bs + j) % len(inputs)] for j in range(bs)]
                router.route(chunk)
                totals.append(router.last_timings["total_ms"])
                embeds.append(router.last_timings["embed_ms"])
                searches.append(router.last_timings["search_ms"])
            out[f"batch_{bs}"] = {**_pcts(totals), "embed_p50_ms": round(float(np.median(embeds)), 3),
                                  "search_p50_ms": round(float(np.median(searches)), 4),
                                  "per_input_p50_ms": round(float(np.median(totals)) / bs, 3), "reps": reps}
    return out


def run_bench(sizes: Sequence[int], kinds: Sequence[str], n_queries: int, k: int, cfg: RetrieverConfig,
              encoder=None, dim: int = 384, hnsw_max: int | None = None) -> dict:
    load0 = os.getloadavg()
    rows = []
    for n in tqdm(sizes, desc="index sizes"):
        use = [kd for kd in kinds if not (kd == "hnsw" and hnsw_max is not None and n > hnsw_max)]
        rows += bench_size(n, use, dim, n_queries, k, cfg)
        tqdm.write(json.dumps([r for r in rows if r["n_keys"] == n]))
    result = {
        "search": rows,
        "end_to_end": bench_end_to_end(encoder, cfg) if encoder is not None else None,
        "setup": {"dim": dim, "queries": n_queries, "k": k, "keys": f"synthetic: unit vectors around n/100 centres, "
                  f"noise {NOISE}/dim", "search_threads": cfg.search_threads, "faiss": faiss.__version__,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
    }
    return result


def format_bench(result: dict) -> str:
    k = result["setup"]["k"]
    lines = [f"| keys | index | search setting | build s | p50 ms | p99 ms | recall@{k} |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in result["search"]:
        setting = ", ".join(f"{a}={b}" for a, b in r["params"].items() if a in ("efSearch", "nprobe", "nlist"))
        lines.append(f"| {r['n_keys']:,} | {r['index']} | {setting or 'exact'} | {r['build_s']} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r[f'recall@{k}']:.3f} |")
    e2e = result.get("end_to_end")
    if e2e:
        lines.append("")
        lines.append(f"end-to-end route ({e2e['library_adapters']} adapters, {e2e['index']} index, "
                     f"embedding included):")
        for key in [x for x in e2e if x.startswith("batch_")]:
            b = e2e[key]
            lines.append(f"  {key.replace('_', ' ')}: p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms "
                         f"(embed {b['embed_p50_ms']:.1f} ms, search {b['search_p50_ms']:.3f} ms, "
                         f"{b['per_input_p50_ms']:.2f} ms per input)")
    s = result["setup"]
    lines.append(f"\n{s['cores']} cores, load average {s['loadavg_start']} -> {s['loadavg_end']}; faiss {s['faiss']}, "
                 f"{s['search_threads']} search thread(s)")
    return "\n".join(lines)


def with_overrides(cfg: RetrieverConfig, **kw) -> RetrieverConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
