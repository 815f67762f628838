"""Where start-up time goes: each deployment times the phases of its start (shown in `/healthz` under `startup`),
and `hyperlora bench startup` measures `hyperlora serve` (what `make serve` runs) from launch to first answers.

    hyperlora bench startup        # a new empty $HYPERLORA_HOME (first start), a restart with it; removed after
    hyperlora bench startup --home ~/.cache/hyperlora --runs restart
    hyperlora bench startup --runs clone --out results/bench_startup_clone.json   # `git clone` of HEAD, then
        # `make serve` in it (the .venv built) on an empty home: what a newcomer waits for
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class Phases:
    """Seconds per named phase of a start, in order; `process` is from the process's creation to this object
    (Python, Ray's worker set-up and the module imports that came before)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.items: dict[str, float] = {"process": round(_process_age(), 2)}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.items[name] = round(now - self.last, 2)
        self.last = now

    def as_dict(self) -> dict[str, float]:
        return {**self.items, "total": round(self.items["process"] + self.last - self.t0, 2)}


def _process_age() -> float:
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or no access: unknown
        return 0.0


class CpuSeconds:
    """CPU seconds (user + system) of a process and all its descendants, by process title, as last seen: a start on
    two cores is CPU-bound, so this says what to take away. A process that ended between two looks keeps its last."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, tuple[str, float]] = {}

    def look(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.seen[p.pid] = (_title(p.cmdline()), round(t.user + t.system, 2))
            except psutil.Error:
                continue

    def as_dict(self) -> dict[str, Any]:
        by: dict[str, float] = {}
        for title, s in self.seen.values():
            by[title] = round(by.get(title, 0.0) + s, 2)
        return {"total": round(sum(by.values()), 1), "by_process": dict(sorted(by.items(), key=lambda kv: -kv[1]))}


def _title(cmdline: list[str]) -> str:
    """`ray::ServeReplica:hyperlora:Gateway` (a Ray worker's title), or the script or program a process runs."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split(".")[0].strip()
    scripts = [a for a in cmdline[1:] if a.endswith(".py") or a.endswith("hyperlora")]
    return Path(scripts[0] if scripts else cmdline[0]).name


def _wait(url: str, proc: subprocess.Popen, timeout_s: float, cpu: CpuSeconds | None = None) -> None:
    import httpx

    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if cpu is not None:
            cpu.look()
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(map(str, proc.args))}` exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no answer from {url} in {timeout_s:.0f} s")


def measure(home: Path, port: int, config: Path, timeout_s: float = 600.0) -> dict[str, Any]:
    """Launch `hyperlora serve` on `home` and time its first answers; stop it after."""
    env = {**os.environ, "HYPERLORA_HOME": str(home), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "hyperlora.py"), "serve", "--port", str(port), "--config", str(config)]
    return _measure(cmd, env, REPO, port, timeout_s)


def measure_clone(port: int, timeout_s: float = 1200.0) -> dict[str, Any]:
    """`git clone` of this repository's HEAD (committed work only) into a new folder, then `make serve` there on a
    new empty HYPERLORA_HOME: what a newcomer runs, the .venv build and the first start (GGUF conversion) included.
    `venv_s` is when the .venv was complete; the folder is removed after."""
    work = Path(tempfile.mkdtemp(prefix="hyperlora-clone-"))
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(work / "repo")], check=True)
        (work / "home").mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["HYPERLORA_HOME"] = str(work / "home")
        t0 = time.time()
        out = _measure(["make", "serve", f"SERVE_ARGS=--port {port}"], env, work / "repo", port, timeout_s)
        stamp = work / "repo" / ".venv" / ".installed"
        out["venv_s"] = round(stamp.stat().st_mtime - t0, 1) if stamp.exists() else None
        out["commit"] = subprocess.run(["git", "-C", str(work / "repo"), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(cmd: list[str], env: dict[str, str], cwd: Path, port: int, timeout_s: float) -> dict[str, Any]:
    import httpx

    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="hyperlora-startup-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out: dict[str, Any] = {}
    cpu = CpuSeconds(proc.pid)
    try:
        _wait(url, proc, timeout_s, cpu)
        out["healthz_s"] = round(time.perf_counter() - t0, 1)
        cpu.look()
        out["cpu_s_to_healthz"] = cpu.as_dict()
        with httpx.Client(base_url=url, timeout=timeout_s) as c:
            r = c.post("/v1/completions", json={"model": "base", "prompt": "Say hi.", "max_tokens": 4})
            out["first_completion_s"] = round(time.perf_counter() - t0, 1) if r.status_code == 200 else None
            r = c.post("/v1/adapters", json={"description": "Answer in French.", "strategy": "generate"})
            out["first_adapter_s"] = round(time.perf_counter() - t0, 1) if r.status_code == 200 else None
            health = c.get("/healthz").json()
        out["startup"] = {name: (health.get(name) or {}).get("startup") for name in ("gateway", "generator",
                                                                                      "router", "llm")}
        out["default_library"] = health.get("default_library")
        out["serve_command"] = _driver_phases(Path(log.name))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        out["log"] = log.name
    return out


def _driver_phases(log: Path) -> dict[str, float] | None:
    """The `startup phases: {...}` line `hyperlora serve` prints."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("startup phases: "):
            return json.loads(line.removeprefix("startup phases: "))
    return None


def run(runs: list[str], home: str | None, port: int, config: Path, out: Path) -> dict[str, Any]:
    """`fresh`: an empty HYPERLORA_HOME (the base model converted, the default library built in the background);
    `restart`: the same home again (or `home` if given); `clone`: a fresh clone's `make serve` (measure_clone)."""
    if home is None and "restart" in runs and "fresh" not in runs[: runs.index("restart")]:
        raise ValueError("a restart run needs a home started before: pass --home (e.g. ~/.cache/hyperlora), or run "
                         "fresh,restart")
    fresh_home = Path(home) if home else Path(tempfile.mkdtemp(prefix="hyperlora-home-"))
    report: dict[str, Any] = {"home": str(fresh_home), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                              "python": sys.executable, "pandas": _importable("pandas")}
    try:
        _runs(runs, fresh_home, port, config, report)
    finally:
        if home is None:  # a temporary home: a converted model and a library, gone with the run
            shutil.rmtree(fresh_home, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", flush=True)
    return report


def _importable(module: str) -> bool:
    """Whether the service's processes can import `module` (Ray Serve imports pandas at start when it can)."""
    code = f"import importlib, sys\ntry:\n    importlib.import_module({module!r})\nexcept ImportError:\n    sys.exit(1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _runs(runs: list[str], fresh_home: Path, port: int, config: Path, report: dict[str, Any]) -> None:
    for name in runs:
        if name not in ("fresh", "restart", "clone"):
            raise ValueError(f"unknown run {name!r}; runs are fresh, restart and clone")
        if name == "fresh" and any(fresh_home.iterdir()):
            raise ValueError(f"a fresh run needs an empty HYPERLORA_HOME, and {fresh_home} is not")
        load = os.getloadavg()[0]
        got = measure_clone(port) if name == "clone" else measure(fresh_home, port, config)
        got["load_average_before"] = round(load, 2)  # other work on the machine slows every phase
        report[name] = got
        if name == "clone":
            print(f"clone: .venv built {got['venv_s']} s after `make serve` began", flush=True)
        print(f"{name}: /healthz answered {got['healthz_s']} s after launch, first completion "
              f"{got['first_completion_s']} s, first generated adapter {got['first_adapter_s']} s", flush=True)
        print(f"  serve command: {got['serve_command']}", flush=True)
        print(f"  CPU seconds to /healthz: {got['cpu_s_to_healthz']}", flush=True)
        for dep, phases in got["startup"].items():
            print(f"  {dep}: {phases}", flush=True)
