"""What a `kill -9` of one replica costs: saves sent 30 ms apart while one replica's process is killed mid-way.

    hyperlora bench chaos                      # starts the service (serve/config.yaml, a fresh temporary library)
    hyperlora bench chaos --url http://127.0.0.1:8000 --api-key KEY   # or a running one on this machine

For each deployment named (default: Gateway, then Generator) it sends `saves` requests `POST /v1/adapters` with
`"save": true`, one every `gap_ms`, and at save `kill_at` kills one of that deployment's replica processes with
SIGKILL (found by the process title Ray gives it, `ray::ServeReplica:<app>:<deployment>`, among the children of
the raylet whose HTTP proxy listens on the service's port: another Ray instance on the machine is never touched).
Then it reports:
non-JSON responses, 5xx responses (by error code), saves acknowledged but missing from `GET /v1/adapters`
(lost), saves refused but stored anyway or stored twice, and how long until every replica process was back.
Figures are printed and written to results/chaos.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

APP = "hyperlora"


@dataclass
class Outcome:
    """One save request."""

    index: int
    name: str
    status: int | None = None  # None: no HTTP response at all (connection error)
    is_json: bool = False
    code: str | None = None  # the error code of an error response
    adapter_id: str | None = None  # what an acknowledged save returned
    sent_at: float = 0.0  # seconds from the first save
    seconds: float = 0.0  # until its response
    error: str | None = None


@dataclass
class Round:
    """The saves sent while one deployment's replica was killed, and what the library holds afterwards."""

    deployment: str
    killed_pid: int | None
    kill_after_s: float | None
    outcomes: list[Outcome] = field(default_factory=list)
    listed_names: Counter = field(default_factory=Counter)  # name -> adapters listed under it
    listed_ids: set[str] = field(default_factory=set)
    replicas_back_s: float | None = None
    first_ok_after_kill_s: float | None = None

    def summary(self) -> dict[str, Any]:
        acked = [o for o in self.outcomes if o.status is not None and 200 <= o.status < 300]
        failed = [o for o in self.outcomes if o not in acked]
        lat = sorted(o.seconds for o in self.outcomes)
        return {
            "deployment": self.deployment, "killed_pid": self.killed_pid, "kill_after_s": self.kill_after_s,
            "sent": len(self.outcomes), "acknowledged": len(acked),
            "non_json": sum(1 for o in self.outcomes if o.status is not None and not o.is_json),
            "no_response": sum(1 for o in self.outcomes if o.status is None),
            "status_5xx": sum(1 for o in self.outcomes if o.status is not None and o.status >= 500),
            "statuses": dict(Counter(str(o.status) for o in self.outcomes)),
            "error_codes": dict(Counter(o.code for o in failed if o.code)),
            "lost": sorted(o.adapter_id for o in acked if o.adapter_id not in self.listed_ids),
            "refused_but_stored": sorted(o.name for o in failed if o.name in self.listed_names),
            "stored_twice": sorted(o.name for o in self.outcomes if self.listed_names[o.name] > 1),
            "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
            "latency_max_s": round(lat[-1], 3) if lat else None,
            "first_ok_after_kill_s": self.first_ok_after_kill_s, "replicas_back_s": self.replicas_back_s,
        }


def replica_pids(deployment: str, port: int, app: str = APP) -> list[int]:
    """The process ids of a deployment's replicas in the Ray instance serving `port` on this machine: Ray titles
    them `ray::ServeReplica:<app>:<deployment>`, and they are children of the same raylet as the HTTP proxy that
    listens on the port (other Ray instances on the machine are left alone)."""
    import psutil

    proxy = next((c.pid for c in psutil.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid), None)
    if proxy is None:
        return []
    raylet = psutil.Process(proxy).ppid()
    title = f"ServeReplica:{app}:{deployment}"
    return sorted(p.pid for p in psutil.process_iter(["ppid", "cmdline"])
                  if p.info["ppid"] == raylet and any(title in part for part in p.info["cmdline"] or []))


async def _save(client: httpx.AsyncClient, i: int, name: str, headers: dict[str, str], t0: float) -> Outcome:
    out = Outcome(index=i, name=name, sent_at=time.perf_counter() - t0)
    body = {"description": f"Chaos check {name}: answer every question about {name} politely.", "save": True,
            "name": name, "strategy": "generate"}
    start = time.perf_counter()
    try:
        r = await client.post("/v1/adapters", json=body, headers=headers)
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"[:200]
        out.seconds = time.perf_counter() - start
        return out
    out.seconds, out.status = time.perf_counter() - start, r.status_code
    try:
        data = r.json()
        out.is_json = r.headers.get("content-type", "").startswith("application/json")
    except ValueError:
        out.error = r.text[:200]
        return out
    if r.is_success:
        out.adapter_id = data["adapters"][0]["id"]
    else:
        out.code = (data.get("error") or {}).get("code")
    return out


async def _wait_back(deployment: str, port: int, before: int, t_kill: float, deadline_s: float) -> float | None:
    """Seconds from the kill until the deployment has `before` live replica processes again."""
    while time.perf_counter() - t_kill < deadline_s:
        if len(replica_pids(deployment, port)) >= before:
            return round(time.perf_counter() - t_kill, 1)
        await asyncio.sleep(0.5)
    return None


async def run_round(url: str, deployment: str, api_key: str | None, saves: int = 60, gap_ms: float = 30.0,
                    kill_at: int = 20, tag: str = "", timeout_s: float = 300.0) -> Round:
    """Send `saves` saves `gap_ms` apart; kill -9 one `deployment` replica just before save `kill_at`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    port = httpx.URL(url).port or 80
    before = replica_pids(deployment, port)
    rnd = Round(deployment=deployment, killed_pid=None, kill_after_s=None)
    limits = httpx.Limits(max_connections=saves + 8, max_keepalive_connections=saves + 8)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        tasks, back = [], None
        for i in range(saves):
            if i == kill_at and before:
                rnd.killed_pid, t_kill = before[0], time.perf_counter()
                os.kill(before[0], signal.SIGKILL)
                rnd.kill_after_s = round(t_kill - t0, 3)
                back = asyncio.ensure_future(_wait_back(deployment, port, len(before), t_kill, timeout_s))
            tasks.append(asyncio.ensure_future(_save(client, i, f"chaos-{tag}{deployment.lower()}-{i}", headers, t0)))
            await asyncio.sleep(gap_ms / 1000)
        rnd.outcomes = list(await asyncio.gather(*tasks))
        if back is not None:
            rnd.replicas_back_s = await back
        if rnd.kill_after_s is not None:
            done_ok = [o.sent_at + o.seconds for o in rnd.outcomes if o.status == 200 and o.index >= kill_at]
            rnd.first_ok_after_kill_s = round(min(done_ok) - rnd.kill_after_s, 2) if done_ok else None
        await _wait_healthy(client, timeout_s)
        listed = (await client.get("/v1/adapters")).json()["data"]
    rnd.listed_ids = {a["id"] for a in listed}
    rnd.listed_names = Counter(a["name"] for a in listed)
    return rnd


async def _wait_healthy(client: httpx.AsyncClient, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1.0)


def print_round(s: dict[str, Any]) -> None:
    print(f"kill -9 {s['deployment']} replica (pid {s['killed_pid']}) {s['kill_after_s']} s into {s['sent']} saves:")
    print(f"  acknowledged {s['acknowledged']}/{s['sent']}, statuses {s['statuses']}, error codes {s['error_codes']}")
    print(f"  non-JSON responses: {s['non_json']}, no response: {s['no_response']}, 5xx: {s['status_5xx']}")
    print(f"  saved adapters lost: {len(s['lost'])} {s['lost'][:5]}; refused but stored: "
          f"{len(s['refused_but_stored'])}; stored twice: {len(s['stored_twice'])}")
    print(f"  latency p50 {s['latency_p50_s']} s, max {s['latency_max_s']} s; first save acknowledged after the kill "
          f"{s['first_ok_after_kill_s']} s later; replica processes back after {s['replicas_back_s']} s")


def run(url: str, api_key: str | None, deployments: list[str], saves: int, gap_ms: float, kill_at: int,
        out: Path) -> dict[str, Any]:
    """Every round in turn; prints each and writes them all to `out`."""
    rounds = []
    tag = f"{int(time.time()) % 100000}-"
    for dep in deployments:
        if not replica_pids(dep, httpx.URL(url).port or 80):
            raise RuntimeError(f"no {dep} replica process on this machine (is the service at {url} local?)")
        rnd = asyncio.run(run_round(url, dep, api_key, saves, gap_ms, kill_at, tag))
        rounds.append(rnd.summary())
        print_round(rounds[-1])
    report = {"url": url, "saves": saves, "gap_ms": gap_ms, "kill_at": kill_at, "rounds": rounds,
              "targets_met": all(r["non_json"] == 0 and r["no_response"] == 0 and not r["lost"] for r in rounds),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"target (no non-JSON response, no saved adapter lost): {'met' if report['targets_met'] else 'MISSED'}; "
          f"wrote {out}")
    return report
