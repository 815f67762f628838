"""HTTP benchmark of a running service: p50/p99 latency and throughput of POST /v1/adapters, /v1/route and
/v1/completions at several concurrency levels (loopback only; bounded request counts)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

ROUTE_INPUTS = [
    "Translate to French: where is the station?", "Is this review positive? The food was cold.",
    "Summarise: the meeting moved to Friday because the room was booked.", "What is 17 times 3?",
    "Fix the grammar: he go to school yesterday.", "Name the capital of Canada.",
    "Classify the topic: the striker scored twice in the final.", "Write a title for a post about sourdough.",
]
DESCRIPTIONS = [
    "Translate English sentences into German.", "Answer arithmetic word problems with a number.",
    "Classify a news headline into sports, politics, business or science.", "Rewrite text in a formal tone.",
    "Extract the person names mentioned in a sentence.", "Answer yes or no to factual questions.",
    "Summarise a paragraph in one sentence.", "Correct the spelling mistakes in a sentence.",
]


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _load(client: httpx.AsyncClient, make: Callable[[int], tuple[str, dict]], n: int,
                concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors: list[str] = []
    tokens = 0
    parts: dict[str, list[float]] = {}  # Server-Timing part -> ms per request

    async def one(i: int) -> None:
        nonlocal tokens
        path, body = make(i)
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(path, json=body)
            dt = time.perf_counter() - t0
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:200]}")
            return
        lat.append(dt)
        tokens += r.json().get("usage", {}).get("completion_tokens", 0)
        timing = parse_server_timing(r.headers.get("server-timing", ""))
        if timing:
            timing["outside"] = 1e3 * dt - timing.get("gateway", 0.0) - timing.get("llm", 0.0)  # proxy, HTTP, client
            for k, v in timing.items():
                parts.setdefault(k, []).append(v)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    out = {"requests": n, "concurrency": concurrency, "ok": len(lat), "errors": len(errors),
           "p50_ms": round(1e3 * percentile(lat, 0.5), 1), "p99_ms": round(1e3 * percentile(lat, 0.99), 1),
           "mean_ms": round(1e3 * statistics.fmean(lat), 1) if lat else None,
           "throughput_rps": round(len(lat) / wall, 2), "wall_s": round(wall, 2)}
    if tokens:
        out["completion_tokens_per_s"] = round(tokens / wall, 1)
    if parts:  # where a request's time went, from the service's Server-Timing headers
        out["server_timing_p50_ms"] = {k: round(percentile(v, 0.5), 1) for k, v in parts.items()}
    if errors:
        out["first_error"] = errors[0]
    return out


def parse_server_timing(header: str) -> dict[str, float]:
    """`a;dur=1.5, b;dur=2` -> {"a": 1.5, "b": 2.0} (parts without a duration are skipped)."""
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name and key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


ENDPOINTS = ("adapters", "route", "completions")  # what `endpoints` may name


async def run_http_bench(url: str, requests: int = 32, concurrency: tuple[int, ...] = (1, 16),
                         max_tokens: int = 16, timeout_s: float = 600.0, ignore_eos: bool = False,
                         endpoints: tuple[str, ...] = ENDPOINTS) -> dict[str, Any]:
    """Benchmark the service at `url` (it must be up). Completions cycle through the library's adapters; with
    `ignore_eos` each decodes exactly `max_tokens` tokens (vLLM's benchmark_serving does so for throughput)."""
    unknown = sorted(set(endpoints) - set(ENDPOINTS))
    if unknown or not endpoints:
        raise ValueError(f"endpoints must be a non-empty subset of {list(ENDPOINTS)}, got {list(endpoints)}")
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        adapters = (await client.get("/v1/adapters")).json()["data"]
        ids = [a["id"] for a in adapters if a["saved"]] or ["base"]
        base = (await client.get("/v1/models")).json()["data"][0]["id"]
        makers: dict[str, Callable[[int], tuple[str, dict]]] = {
            "adapters": lambda i: ("/v1/adapters", {"description": DESCRIPTIONS[i % len(DESCRIPTIONS)]}),
            "route": lambda i: ("/v1/route", {"input": ROUTE_INPUTS[i % len(ROUTE_INPUTS)], "top_k": 3}),
            "completions": lambda i: ("/v1/completions", {
                "model": ids[i % len(ids)], "prompt": ROUTE_INPUTS[i % len(ROUTE_INPUTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": ignore_eos}),
        }
        await client.post("/v1/completions", json={"model": base, "prompt": "warm up", "max_tokens": 2})
        results: dict[str, Any] = {}
        for key in (e for e in ENDPOINTS if e in endpoints):
            name, make = f"POST /v1/{key}", makers[key]
            await _load(client, make, min(4, requests), 1)  # warm-up: first loads, first batches
            for c in concurrency:
                n = max(requests, c) if c > 1 else requests
                res = await _load(client, make, n, c)
                results[f"{name} c={c}"] = res
                print(f"{name:<22} c={c:<3} p50 {res['p50_ms']:>8.1f} ms  p99 {res['p99_ms']:>8.1f} ms  "
                      f"{res['throughput_rps']:>7.2f} req/s" +
                      (f"  {res['completion_tokens_per_s']:.1f} tokens/s" if "completion_tokens_per_s" in res else "")
                      + (f"  ERRORS {res['errors']}: {res['first_error']}" if res["errors"] else ""), flush=True)
                if "server_timing_p50_ms" in res:
                    print("    p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in res["server_timing_p50_ms"].items()),
                          flush=True)
        return {"url": url, "adapters_cycled": len(ids), "max_tokens": max_tokens, "ignore_eos": ignore_eos,
                "results": results}
