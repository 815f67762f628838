"""`hyperlora bench fuzz`: Schemathesis against a running service for a time budget, every check, then a summary.

It runs the Schemathesis CLI (`schemathesis --config-file serve/schemathesis.toml run URL/openapi.json --checks all
--max-time S --seed N`) with the API key, lets it write its event report, and reduces that to what the service
promises: no 5xx and no failed check (status codes, content types, response schemas, headers, `Allow` on 405,
positive data accepted, negative data rejected, ...). The figures are printed and written to `results/fuzz.json`,
Schemathesis' own report (every failure with a curl line to reproduce it) to `results/fuzz.log`. Not part of the
test suite (a bounded, seeded run is: tests/test_serve_app.py); this is the long run against the real models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import typer

RESULTS = Path("results")
LOOPBACK = ("http://127.0.0.1", "http://localhost", "http://[::1]")
CONFIG = Path(__file__).with_name("schemathesis.toml")  # the one documented exception (archive uploads)


def schemathesis_command(url: str, seconds: int, seed: int, api_key: str | None, report: Path,
                         workers: int = 1) -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        raise typer.BadParameter("schemathesis is not installed in this environment (pip install schemathesis)")
    cmd = [exe, "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "--checks", "all",
           "--max-time", str(seconds), "--seed", str(seed),
           "--workers", str(workers), "--continue-on-failure", "--report", "ndjson",
           "--report-ndjson-path", str(report), "--no-color"]
    if api_key:
        cmd += ["--header", f"Authorization: Bearer {api_key}"]
    return cmd


def summarise(events: list[dict]) -> dict:
    """Requests, status classes and failures by check from Schemathesis' NDJSON events."""
    statuses: Counter = Counter()
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    operations = set()
    for ev in events:
        for kind, body in ev.items():
            if kind != "ScenarioFinished" or not isinstance(body, dict):
                continue
            recorder = body.get("recorder") or {}
            label = recorder.get("label", "")
            operations.add(label)
            for interactions in (recorder.get("interactions") or {}).values():
                resp = (interactions or {}).get("response") or {}
                if "status_code" in resp:
                    statuses[f"{resp['status_code'] // 100}xx"] += 1
            for checks in (recorder.get("checks") or {}).values():
                for c in checks or []:
                    if str(c.get("status", "")).lower() == "failure":
                        failure = (c.get("failure_info") or {}).get("failure") or {}
                        name = f"{failure.get('code', '')} {c.get('name', '?')}".strip()
                        failures[name] += 1
                        examples.setdefault(name, f"{label}: {failure.get('title', '')}: "
                                                  f"{str(failure.get('message', ''))[:300]}")
    return {"requests": sum(statuses.values()), "by_status_class": dict(sorted(statuses.items())),
            "server_errors": statuses.get("5xx", 0), "failed_checks": dict(failures),
            "failure_examples": examples, "operations": len(operations - {""})}


def bench_fuzz(
    url: str = typer.Option(..., help="A running service on loopback, e.g. http://127.0.0.1:8000."),
    minutes: float = typer.Option(10.0, help="Time budget of the Schemathesis run."),
    seed: int = typer.Option(0, help="Schemathesis seed (a rerun sends the same requests)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="HYPERLORA_API_KEY",
                                       help="The service's API key (default $HYPERLORA_API_KEY)."),
    out: Path = typer.Option(RESULTS / "fuzz.json", help="Where the summary goes."),
) -> None:
    """Fuzz the running service with Schemathesis (every check) for --minutes; print and write the summary."""
    if not url.startswith(LOOPBACK):
        raise typer.BadParameter("fuzzing runs against loopback only: --url http://127.0.0.1:PORT")
    if not 0 < minutes <= 120:
        raise typer.BadParameter("minutes must be in (0, 120]")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "events.ndjson"
        cmd = schemathesis_command(url.rstrip("/"), int(minutes * 60), seed, api_key, report)
        typer.echo(f"running Schemathesis for {minutes:g} min against {url} (seed {seed})...")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
        seconds = time.perf_counter() - t0
        events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()] \
            if report.is_file() else []
    summary = {"url": url, "seed": seed, "seconds": round(seconds, 1), "schemathesis_exit": proc.returncode,
               "command": " ".join(c if "Bearer" not in c else "Authorization: Bearer ***" for c in cmd[1:]),
               **summarise(events)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    typer.echo(f"requests {summary['requests']} over {summary['operations']} operations in {seconds:.0f} s; "
               f"status classes {summary['by_status_class']}; 5xx {summary['server_errors']}; "
               f"failed checks {summary['failed_checks'] or 'none'}")
    for name, ex in summary["failure_examples"].items():
        typer.echo(f"  {name}: {ex}")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("fuzz")(bench_fuzz)
