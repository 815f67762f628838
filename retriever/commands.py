"""`hyperlora library add|list|show|remove|build-default`, `hyperlora route`, `hyperlora bench route`,
`hyperlora eval routing`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retriever.config import RetrieverConfig
from retriever.library import AdapterLibrary, default_library_root

LibOpt = typer.Option(None, "--library", "-l", help="Library directory (default: $HYPERLORA_HOME/library).")
library_app = typer.Typer(help="Manage the adapter library: add PEFT adapters, list, show and remove them.",
                          no_args_is_help=True)


def _open(root: Path | None, spec=None) -> AdapterLibrary:
    try:
        return AdapterLibrary(root or default_library_root(), spec)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--library") from e


def _default_spec(root: Path | None):
    """The embedded base model's spec for a library that has none recorded yet."""
    from generator.config import load_spec

    lib = AdapterLibrary(root or default_library_root())
    return None if lib.spec is not None else load_spec()


@library_app.command("add")
def add(path: Path = typer.Argument(..., help="A PEFT LoRA dir: adapter_config.json + adapter_model.safetensors."),
        name: str = typer.Option(..., "--name", "-n", help="A short name, e.g. the task."),
        description: list[str] = typer.Option(..., "--description", "-d", help="What it does; repeat for several."),
        source: str = typer.Option("uploaded", "--source", help="trained, generated or uploaded."),
        sample_input: list[str] = typer.Option([], "--sample-input", "-s",
                                               help="An input of its task; repeat. Improves routing."),
        library: Path | None = LibOpt) -> None:
    """Validate a PEFT adapter (no pickle, finite, fits the base model) and add a copy to the library."""
    lib = _open(library, _default_spec(library))
    try:
        rec = lib.add_peft_dir(path, name, description, source, sample_input)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"added {rec.id}  {rec.name}  (rank {rec.rank}, {', '.join(rec.target_modules)})")


@library_app.command("list")
def list_(library: Path | None = LibOpt,
          as_json: bool = typer.Option(False, "--json", help="Print the records as JSON.")) -> None:
    """List the library's adapters, oldest first."""
    records = _open(library).list()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    if not records:
        typer.echo("the library is empty: `hyperlora library add` or `hyperlora library build-default`")
    for r in records:
        typer.echo(f"{r.id}  {r.source:<9}  r={r.rank:<3} {r.name}")


@library_app.command("show")
def show(adapter_id: str = typer.Argument(..., help="The adapter's id (see `library list`)."),
         library: Path | None = LibOpt) -> None:
    """Print one adapter's record as JSON."""
    lib = _open(library)
    try:
        typer.echo(json.dumps(lib.get(adapter_id).to_dict(), indent=2, ensure_ascii=False))
    except (KeyError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="ADAPTER_ID") from e


@library_app.command("remove")
def remove(adapter_id: str = typer.Argument(..., help="The adapter's id."), library: Path | None = LibOpt) -> None:
    """Delete an adapter from the library."""
    lib = _open(library)
    try:
        lib.remove(adapter_id)
    except (KeyError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="ADAPTER_ID") from e
    typer.echo(f"removed {adapter_id}")


@library_app.command("build-default")
def build_default(library: Path | None = LibOpt,
                  trained_dir: Path | None = typer.Option(None, "--trained-dir",
                                                          help="Trained LoRA library (default: runs/lora-library)."),
                  limit: int | None = typer.Option(None, "--limit", help="At most this many tasks.")) -> None:
    """Fill the library with the default adapters: the trained LoRA library if present, else adapters the shipped
    hypernetwork generates for the 297 train tasks. Tasks already present are skipped."""
    from retriever.default import build_default_library, library_nbytes

    lib = build_default_library(library, trained_dir=trained_dir, limit=limit)
    typer.echo(f"{lib.root}: {len(lib)} adapters, {library_nbytes(lib):,} bytes of weights")


def route(text: list[str] = typer.Argument(..., help="Input text(s) to route."),
          k: int = typer.Option(3, "--top-k", "-k", help="Adapters per input (1-64)."),
          library: Path | None = LibOpt,
          index: str = typer.Option("auto", "--index", help="auto, flat, hnsw or ivf."),
          as_json: bool = typer.Option(False, "--json", help="Print the routes as JSON.")) -> None:
    """Rank the library's adapters for each input: scores (cosine), mixture weights, and whether to abstain.
    The default library is built first if it is empty."""
    from generator.encoder import TaskEncoder
    from retriever.default import ensure_default_library
    from retriever.router import Router

    try:
        cfg = RetrieverConfig(index=index, top_k=k)
        lib = _open(library) if library else ensure_default_library()
        routes = Router(lib, TaskEncoder.load(), cfg).route(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in routes], indent=2))
        return
    for t, r in zip(text, routes, strict=True):
        typer.echo(f"{t[:80]!r}{'  -> ABSTAIN (best score under threshold)' if r.abstain else ''}")
        for i, n, s, w in zip(r.ids, r.names, r.scores, r.weights, strict=True):
            typer.echo(f"  {s:6.3f}  w={w:.3f}  {i}  {n}")


def bench_route(sizes: str = typer.Option("1000,10000,100000,1000000", "--sizes", help="Comma-separated key counts."),
                kinds: str = typer.Option("flat,hnsw,ivf", "--indexes", help="Index types to measure."),
                queries: int = typer.Option(200, "--queries", help="Single-query searches per measurement."),
                hnsw_max: int | None = typer.Option(None, "--hnsw-max", help="Skip HNSW above this many keys."),
                e2e: bool = typer.Option(True, "--e2e/--no-e2e", help="Also time routing with the real embedder."),
                out: Path = typer.Option(Path("results/bench_route.json"), "--out", help="JSON output.")) -> None:
    """Search latency p50/p99 and recall@10 vs exact search at 1e3..1e6 keys (flat, HNSW, IVF), and end-to-end
    route latency (embedding included) for 1 input and a batch of 32."""
    from generator.encoder import TaskEncoder
    from retriever.bench import format_bench, run_bench

    cfg = RetrieverConfig()
    encoder = TaskEncoder.load() if e2e else None
    result = run_bench([int(s) for s in sizes.split(",")], kinds.split(","), queries, 10, cfg, encoder,
                       dim=encoder.dim if encoder else 384, hnsw_max=hnsw_max)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(format_bench(result))
    typer.echo(f"\nwrote {out}")


def eval_routing(library: Path | None = LibOpt,
                 sni: Path = typer.Option(Path("../shared/data/sni"), "--sni", help="SNI data directory."),
                 n_heldout: int = typer.Option(10, "--heldout", help="Held-out inputs per task (routing accuracy)."),
                 rouge_tasks: int = typer.Option(8, "--rouge-tasks", help="Tasks in the ROUGE-L part (0 skips it)."),
                 rouge_instances: int = typer.Option(5, "--rouge-instances", help="Inputs per task (ROUGE-L)."),
                 max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Greedy tokens per answer."),
                 top_k: int = typer.Option(3, "--top-k", help="Adapters mixed or fused per input."),
                 out_dir: Path = typer.Option(Path("results"), "--out-dir", help="Where routing.json/.md go.")) -> None:
    """Routing top-1/top-3 accuracy on held-out SNI inputs of the library's tasks, the abstain rate on tasks with
    no adapter, and ROUGE-L of selection vs mixture vs fusion with each input's own adapter removed.
    Uses the default set of adapters in --library (added first: trained LoRAs if present, else generated ones)."""
    from generator.config import GeneratorConfig, build_generator
    from retriever.default import ensure_default_library, trained_adapter_dirs
    from retriever.evaluate import EvalRoutingConfig, format_eval, run_eval, write_results

    ecfg = EvalRoutingConfig(str(sni), n_heldout, rouge_tasks, rouge_instances, max_new_tokens, top_k)
    generator = None if trained_adapter_dirs(None) else build_generator(GeneratorConfig())
    lib = ensure_default_library(library, generator)
    result = run_eval(lib, generator.encoder if generator else _encoder(), RetrieverConfig(top_k=top_k), ecfg,
                      generator_trained=getattr(generator, "trained", None))
    js, md = write_results(result, out_dir)
    typer.echo(format_eval(result))
    typer.echo(f"\nwrote {js} and {md}")


def _encoder():
    from generator.encoder import TaskEncoder

    return TaskEncoder.load()


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(library_app, name="library")
    app.command("route")(route)
    bench_app.command("route")(bench_route)
    from generator.commands import command_group

    eval_app = command_group(app, "eval", "Evaluations: print figures and write them to results/.")
    eval_app.command("routing")(eval_routing)
    from retriever import strategy_commands

    strategy_commands.register(app, bench_app)
