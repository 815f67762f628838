"""`python -m serve.bench_strategy_http`: POST /v1/adapters latency with `auto` over HTTP, concurrency 1, for
descriptions of library tasks (held-out paraphrases of train tasks, which the default library holds) and of new
tasks (serve.bench_http.DESCRIPTIONS). It starts `hyperlora serve` on the default config, waits for it, warms up,
times the requests, prints p50/p99 and the paths auto took, and writes `results/bench_strategy_http.json`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from retriever.calibrate import EVALUATION_SLICE
from retriever.tasks import load_sni
from serve.bench_http import DESCRIPTIONS, percentile
from serve.startup import _wait as wait_until_up


def _time(client: httpx.Client, descriptions: list[str], n: int) -> dict:
    ms, paths = [], {}
    for i in range(n):
        t = time.perf_counter()
        r = client.post("/v1/adapters", json={"description": descriptions[i % len(descriptions)]})
        ms.append(1e3 * (time.perf_counter() - t))
        path = r.json()["decisions"][0]["path"] if r.status_code == 200 else f"HTTP {r.status_code}"
        paths[path] = paths.get(path, 0) + 1
    return {"requests": n, "p50_ms": round(percentile(ms, 0.5), 1), "p99_ms": round(percentile(ms, 0.99), 1),
            "paths": paths}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sni", default="../shared/data/sni", help="SNI data (train tasks' held-out paraphrases).")
    p.add_argument("--requests", type=int, default=40, help="Requests per kind of description.")
    p.add_argument("--port", type=int, default=18811)
    p.add_argument("--out", type=Path, default=Path("results/bench_strategy_http.json"))
    args = p.parse_args(argv)
    train = load_sni(args.sni, "train")
    library_tasks = [train[t]["descriptions"][EVALUATION_SLICE.start] for t in sorted(train)[::15]]
    proc = subprocess.Popen([sys.executable, "-m", "hyperlora", "serve", "--port", str(args.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        t0 = time.perf_counter()
        wait_until_up(url, proc, 600)
        ready = time.perf_counter() - t0
        out: dict = {"what": f"POST /v1/adapters (strategy auto), concurrency 1, {args.requests} requests per kind "
                             "after 8 warm-up, `hyperlora serve` on the default config, this machine",
                     "ready_s": round(ready, 1)}
        with httpx.Client(base_url=url, timeout=120) as client:
            for d in library_tasks[:4] + DESCRIPTIONS[:4]:
                client.post("/v1/adapters", json={"description": d})
            for kind, descriptions in (("library-task description", library_tasks),
                                       ("new-task description", list(DESCRIPTIONS))):
                out[kind] = _time(client, descriptions, args.requests)
                print(f"auto, {kind:<26} p50 {out[kind]['p50_ms']:>7.1f} ms  p99 {out[kind]['p99_ms']:>7.1f} ms  "
                      f"paths {out[kind]['paths']}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
