"""`hyperlora serve` (what `make serve` runs) and `hyperlora bench serve`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import typer

from serve.config import DEFAULT_CONFIG

logger = logging.getLogger(__name__)
RESULTS = Path("results")
APP_NAME = "hyperlora"

ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Serve config YAML (the one `serve deploy` takes).")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    bench_app.command("serve")(bench_serve)
    bench_app.command("chaos")(bench_chaos)
    bench_app.command("startup")(bench_startup)


def _warn_untrained(cfg) -> None:
    from generator.models import DEFAULT_BASE_MODEL, default_checkpoint

    shipped = default_checkpoint(cfg.generator) if cfg.base_model == DEFAULT_BASE_MODEL else None
    if cfg.checkpoint is None and shipped is None:
        typer.secho("WARNING: no trained hypernetwork checkpoint (generator/checkpoints/smollm2-t2l is missing): the "
                    "service generates adapters with a FRESHLY INITIALISED hypernetwork. They are well-formed but "
                    "carry no task knowledge. Train one with `hyperlora train hypernet` or pass --checkpoint.",
                    fg=typer.colors.RED, bold=True, err=True)


def _prepare_base_model(base_model: str) -> None:
    """A first start converts the embedded GGUF: begin now, while Ray starts, instead of when the replicas ask for
    it (they wait for this conversion through its lock: generator.models.resolve_base_model)."""
    import threading

    from generator.models import resolve_base_model

    def convert() -> None:
        try:
            resolve_base_model(base_model)
        except Exception as e:  # noqa: BLE001 - the replicas try again and report it
            logger.warning("preparing the base model failed: %s", e)

    threading.Thread(target=convert, name="base-model", daemon=True).start()


def api_key_notice(cfg) -> tuple[str, bool]:
    """What the console says about the API key: (text, whether it is a warning)."""

    if os.environ.get(cfg.api_key_env):
        return (f"{cfg.api_key_env} is set: saving, uploading and deleting adapters need it "
                f"(`Authorization: Bearer <key>` or `X-API-Key`).", False)
    return (f"{cfg.api_key_env} is NOT set: saving, uploading and deleting adapters are accepted only from local "
            f"programs on this machine (loopback, no web-page Origin/Referer of another site, no form posts); "
            f"anyone who can reach {cfg.host}:{cfg.port} can still read adapters and run completions. Set "
            f"{cfg.api_key_env} before serving on another address than 127.0.0.1.", True)


def start_service(cfg, wait_s: float = 900.0, phases=None) -> str:
    """Start Ray (if needed), Serve on cfg.host:cfg.port and the application; return its URL once healthy.
    `phases` (serve.startup.Phases) gets the seconds of each step."""
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.proxy_retry import CALLBACK, CALLBACK_ENV
    from serve.startup import Phases

    phases = phases or Phases()

    # Serve's proxy resends a request whose Gateway replica died and answers its own errors as JSON; the proxy
    # inherits this from the Ray processes started here (with `serve run` / `serve deploy`: export it first)
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    phases.mark("ray_init")
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    phases.mark("serve_start")
    app = build_app(cfg)
    phases.mark("build_app")
    serve.run(app, name=APP_NAME, route_prefix="/")
    phases.mark("deployments")
    url = f"http://{cfg.host}:{cfg.port}"
    deadline = time.time() + wait_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=30).status_code == 200:
                phases.mark("healthy")
                return url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"the service at {url} did not become healthy in {wait_s:.0f} s")
        time.sleep(1.0)


def stop_service() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_command(
    config: Path = ConfigOpt,
    host: str | None = typer.Option(None, help="Listen address (default from the config: 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (default from the config: 8000)."),
    library: str | None = typer.Option(None, help="Adapter library directory (default $HYPERLORA_HOME/library)."),
    checkpoint: str | None = typer.Option(None, help="Hypernetwork checkpoint (default: the shipped one)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Embedded default or a local HF directory."),
) -> None:
    """Serve the application (Gateway, Generator, Router, LLM) until Ctrl-C."""
    from serve.config import ServeConfig
    from serve.startup import Phases

    phases = Phases()  # `process`: the command's own start (Python and its imports)
    cfg = ServeConfig.from_yaml(config, host=host, port=port, library=library, checkpoint=checkpoint,
                                base_model=base_model)
    _prepare_base_model(cfg.base_model)
    _warn_untrained(cfg)
    notice, warn = api_key_notice(cfg)
    typer.secho(notice, fg=typer.colors.YELLOW if warn else typer.colors.GREEN, bold=warn, err=warn)
    typer.echo(f"starting hyperlora on {cfg.host}:{cfg.port} (first start converts the base model and builds the "
               f"default library: a minute or two)...")
    url = start_service(cfg, phases=phases)
    typer.echo(f"startup phases: {json.dumps(phases.as_dict())}")
    typer.secho(f"\nhyperlora is serving at {url}  (OpenAPI docs: {url}/docs)", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"""
  curl -s {url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "auto", "prompt": "Translate to French: good morning", "max_tokens": 32}}'
  curl -s {url}/v1/adapters -H 'Content-Type: application/json' \\
       -d '{{"description": "Answer every question like a pirate."}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  client.chat.completions.create(model="auto", messages=[{{"role": "user", "content": "hello"}}])

Ctrl-C stops it.""")

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopping...")
    finally:
        stop_service()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_serve_results(update: dict, path: Path = RESULTS / "bench_serve.json") -> Path:
    """Merge `update` into results/bench_serve.json, with the engine figures of every device measured so far."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(update)
    for f in sorted(RESULTS.glob("bench_engine_*.json")):
        data.setdefault("engine", {})[f.stem.removeprefix("bench_engine_")] = json.loads(f.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def bench_serve(
    url: str | None = typer.Option(None, help="A running service (loopback); default: start one in-process."),
    config: Path = ConfigOpt,
    requests: int = typer.Option(32, help="Requests per endpoint and concurrency level."),
    concurrency: str = typer.Option("1,16", help="Comma-separated concurrency levels."),
    max_tokens: int = typer.Option(16, help="max_tokens of each completion."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Completions decode exactly max_tokens tokens, "
                                    "past the end-of-turn token (vLLM's flag; what its throughput runs use)."),
    endpoints: str = typer.Option("adapters,route,completions", help="Comma-separated endpoints to measure."),
    out: Path = typer.Option(RESULTS / "bench_serve.json", help="JSON the figures are merged into."),
    engine_only: bool = typer.Option(False, "--engine-only", help="Benchmark the LLM engine alone, no HTTP."),
    device: str = typer.Option("cpu", help="--engine-only: torch device."),
    dtype: str = typer.Option("fp32", help="--engine-only: fp32, bf16 or fp16."),
    gguf_dir: str | None = typer.Option(None, help="--engine-only: load the base model from a GGUF in this dir."),
    batch: int = typer.Option(32, help="--engine-only: prompts per batch."),
    adapters: int = typer.Option(32, help="--engine-only: distinct adapters."),
    new_tokens: int = typer.Option(32, help="--engine-only: tokens generated per prompt."),
    repeats: int = typer.Option(2, help="--engine-only: timed runs per scenario (median)."),
) -> None:
    """p50/p99 latency and throughput of the service's endpoints, or (--engine-only) the engine's decode
    throughput with 1 vs 8 vs N distinct adapters against PEFT; writes results/bench_serve.json."""
    if requests < 1 or requests > 1000:
        raise typer.BadParameter("requests must be in [1, 1000]")
    if engine_only and device.startswith("cuda"):  # the static step against HF and PEFT, random weights
        from serve.bench_decode import run as run_decode

        run_decode(device, dtype, new_tokens=max(new_tokens, 64), peft_tokens=8, repeats=max(repeats, 3), cap_s=20.0,
                   budget_s=200.0, tiny=False, big_batch=256, out=str(RESULTS / "bench_engine_cuda.json"))
        typer.echo(f"engine figures merged into {write_serve_results({})}")
        return
    if engine_only:
        from serve.bench_engine import run_benchmark

        report = run_benchmark(device, dtype, gguf_dir=gguf_dir, batch=batch, n_adapters=adapters,
                               new_tokens=new_tokens, repeats=repeats)
        path = write_serve_results({})
        typer.echo(f"engine figures ({report['setup']['device']}) merged into {path}")
        return
    levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    from serve.bench_http import ENDPOINTS

    names = tuple(e.strip() for e in endpoints.split(",") if e.strip())
    if not names or set(names) - set(ENDPOINTS):
        raise typer.BadParameter(f"--endpoints takes some of {','.join(ENDPOINTS)}, got {endpoints!r}")
    started = url is None
    if started:
        from serve.config import ServeConfig

        cfg = ServeConfig.from_yaml(config, host="127.0.0.1", port=_free_port())
        typer.echo("starting the service in-process on the config's models (may take a few minutes)...")
        url = start_service(cfg)
    elif not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise typer.BadParameter("benchmarks run against loopback only: --url http://127.0.0.1:PORT")
    try:
        from serve.bench_http import run_http_bench

        report = asyncio.run(run_http_bench(url, requests, levels, max_tokens, ignore_eos=ignore_eos,
                                            endpoints=names))
    finally:
        if started:
            stop_service()
    path = write_serve_results({"http": report}, out)
    typer.echo(f"wrote {path}")


def bench_chaos(
    url: str | None = typer.Option(None, help="A running service on this machine; default: start one in-process "
                                              "(the config's models, a fresh temporary library)."),
    api_key: str | None = typer.Option(None, envvar="HYPERLORA_API_KEY", help="The service's API key, if it has one."),
    config: Path = ConfigOpt,
    deployments: str = typer.Option("Gateway,Generator", help="Whose replica to kill, one round each, in turn."),
    saves: int = typer.Option(60, help="Saves per round."),
    gap_ms: float = typer.Option(30.0, help="Milliseconds between two saves."),
    kill_at: int = typer.Option(20, help="The replica is killed just before this save."),
    out: Path = typer.Option(RESULTS / "chaos.json", help="Where the figures go."),
) -> None:
    """kill -9 one replica while adapters are being saved: non-JSON responses, 5xx and saved adapters lost."""
    import secrets
    import shutil
    import tempfile

    from serve.chaos import run

    if not 1 <= saves <= 1000 or not 0 <= kill_at < saves:
        raise typer.BadParameter("saves must be in [1, 1000] and kill_at in [0, saves)")
    names = [d.strip() for d in deployments.split(",") if d.strip()]
    started = url is None
    if started:
        from serve.config import ServeConfig

        api_key = api_key or secrets.token_hex(16)
        os.environ["HYPERLORA_API_KEY"] = api_key  # the replicas inherit it from the Ray started here
        library = tempfile.mkdtemp(prefix="hyperlora-chaos-")
        cfg = ServeConfig.from_yaml(config, host="127.0.0.1", port=_free_port(), library=library,
                                    default_library=False)
        typer.echo(f"starting the service in-process (library {library})...")
        url = start_service(cfg)
    elif not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise typer.BadParameter("the replicas are killed on this machine: --url http://127.0.0.1:PORT")
    try:
        run(url, api_key, names, saves, gap_ms, kill_at, out)
    finally:
        if started:
            stop_service()
            shutil.rmtree(library, ignore_errors=True)


def bench_startup(
    runs: str = typer.Option("fresh,restart", help="fresh: an empty HYPERLORA_HOME; restart: the same home again."),
    home: str | None = typer.Option(None, help="HYPERLORA_HOME to use (default: a new empty temporary one)."),
    config: Path = ConfigOpt,
    out: Path = typer.Option(RESULTS / "bench_startup.json", help="Where the figures go."),
) -> None:
    """Seconds from launching `hyperlora serve` (what `make serve` runs) to its first answers, per phase."""
    from serve.startup import run

    run([r.strip() for r in runs.split(",") if r.strip()], home, _free_port(), config, out)
