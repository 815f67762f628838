"""`hyperlora generate --strategy`, `hyperlora train|eval|bench strategy`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer

from generator import commands as gen_cmds
from retriever.strategy_config import STRATEGY_NAMES, StrategyConfig

LibOpt = typer.Option(None, "--library", "-l", help="Library directory (default: $HYPERLORA_HOME/library).")
SniOpt = typer.Option(Path("../shared/data/sni"), "--sni", help="SNI data directory.")


def generate(
    description: str = typer.Argument(..., help="What the adapter should make the model do, in one sentence."),
    out: Path = typer.Option(Path("adapter"), "--out", "-o", help="Directory to write the PEFT adapter to."),
    strategy: str = typer.Option(
        "generate", "--strategy", "-s", help="generate (always generate), retrieve (the library adapter whose "
        "descriptions are nearest) or auto (the library adapter on a confident match, a mixture when some are near, "
        "else generate). retrieve and auto read --library."),
    library: Path | None = LibOpt, checkpoint: str | None = gen_cmds.CkptOpt, generator: str = gen_cmds.GenOpt,
    base_model: str = gen_cmds.BaseOpt, embedder: str = gen_cmds.EmbOpt, device: str = gen_cmds.DevOpt,
) -> None:
    """Generate a LoRA adapter from a task description (or take the library's), and write it as a PEFT directory."""
    if strategy not in STRATEGY_NAMES:
        raise typer.BadParameter(f"{strategy!r} is not a strategy; choose from {list(STRATEGY_NAMES)}",
                                 param_hint="--strategy")
    if strategy == "generate":
        return gen_cmds.generate(description, out, checkpoint, generator, base_model, embedder, device)
    _decide_and_write(description, out, strategy, library, gen_cmds.build_or_fail(
        description, checkpoint, generator, base_model, embedder, device))


def _decide_and_write(description: str, out: Path, strategy: str, library: Path | None, gen) -> None:
    import torch

    from generator.peft_io import save_peft
    from retriever.library import AdapterLibrary, default_library_root
    from retriever.strategy import DescriptionStrategy

    try:
        lib = AdapterLibrary(library or default_library_root(), gen.spec)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--library") from e
    chooser = DescriptionStrategy(lib, gen.encoder, StrategyConfig(strategy=strategy))
    (d,), vectors = chooser.decide([description])
    made = gen.generate_embedded(torch.from_numpy(vectors), [description])[0] if d.needs_generation else None
    adapter = chooser.build(d, made) or lib.load(d.library_id)
    save_peft(adapter, out)
    for m in d.matches:
        typer.echo(f"  library match {m.similarity:6.3f}  {m.id}  {m.name}")
    what = {"retrieve": f"the library adapter {d.library_id}", "generate": "a generated adapter",
            "mix": "a mixture of " + ", ".join(f"{i or 'generated'} ({w:.2f})" for i, w in d.mixture)}[d.path]
    typer.echo(f"{strategy}: {what} (rank {adapter.rank}); confidence {d.confidence:.2f} (nearest train task "
               f"{d.nearest_train_task}, similarity {d.train_similarity:.3f}) -> {out}")
    if d.warning:
        typer.secho(f"WARNING: {d.warning}", fg=typer.colors.RED, err=True)


def train_strategy(sni: Path = SniOpt,
                   queries: int = typer.Option(50, "--queries", help="Held-out paraphrases per train task (1-50)."),
                   quality: tuple[float, float, float] = typer.Option(
                       (52.0, 21.0, 5.0), "--quality", help="Expected ROUGE-L of a task's own LoRA, a generated "
                       "adapter and another task's LoRA (train tasks): what the match threshold maximises."),
                   limit: int | None = typer.Option(None, "--limit", help="At most this many train tasks."),
                   projection_steps: int = typer.Option(
                       400, "--projection-steps", help="Steps fitting the description projection (0: none, raw "
                       "cosines); it is kept only if it raises the match fit's expected ROUGE-L."),
                   out: Path | None = typer.Option(None, "--out", help="Calibration JSON (default: the shipped one)."),
                   rows: Path | None = typer.Option(None, "--rows",
                                                    help="Train-task embeddings (default: the shipped safetensors).")
                   ) -> None:
    """Calibrate the description strategy on held-out paraphrases of the train tasks (never dev tasks): writes the
    thresholds JSON, the description projection beside it (when it beats raw cosines) and the train-task embeddings
    that `confidence` is measured against."""
    from generator.encoder import TaskEncoder
    from retriever.calibrate import CalibrationConfig, calibrate
    from retriever.projection import ProjectionConfig
    from retriever.strategy import CALIBRATION_FILE, TRAIN_TASKS_FILE

    try:
        ccfg = CalibrationConfig(str(sni), queries, quality_own=quality[0], quality_generated=quality[1],
                                 quality_other=quality[2], limit=limit,
                                 projection=ProjectionConfig(steps=projection_steps))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    result = calibrate(TaskEncoder.load(), ccfg, out or CALIBRATION_FILE, rows or TRAIN_TASKS_FILE)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    typer.echo(f"wrote {out or CALIBRATION_FILE} and {rows or TRAIN_TASKS_FILE}")


def eval_strategy(library: Path | None = typer.Option(None, "--library",
                                                      help="Trained train-task LoRAs: PEFT folders named by task."),
                  dev_library: Path | None = typer.Option(None, "--dev-library",
                                                          help="Dev-task LoRAs (PEFT folders named by task) for (c)."),
                  sni: Path = SniOpt, checkpoint: str | None = gen_cmds.CkptOpt, generator: str = gen_cmds.GenOpt,
                  base_model: str = gen_cmds.BaseOpt,
                  tasks: int = typer.Option(8, "--tasks", help="Tasks per setting."),
                  inputs: int = typer.Option(4, "--inputs", help="Test inputs per task."),
                  max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Greedy tokens per answer."),
                  batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generate call."),
                  device: str = gen_cmds.DevOpt,
                  paraphrases: str = typer.Option("evaluation", "--paraphrases", help="evaluation: settings (a), "
                                                  "(b), (c) on descriptions 150-199 (strategy.json/.md); "
                                                  "calibration: train tasks only, on descriptions 100-149, the "
                                                  "library's tasks and tasks it lacks, for the served ROUGE-L of "
                                                  "each outcome (strategy-calibration.json/.md) that `train "
                                                  "strategy --quality` takes."),
                  calibration: Path | None = typer.Option(None, "--calibration", exists=True, dir_okay=False,
                                                          help="Thresholds JSON to decide with (default: the shipped "
                                                          "one), e.g. another fit to compare."),
                  out_dir: Path = typer.Option(Path("results"), "--out-dir", help="Where strategy.json/.md go."),
                  ) -> None:
    """ROUGE-L of generate / retrieve / auto on (a) train tasks described by held-out paraphrases, (b) dev tasks,
    (c) dev tasks with their own adapter in the library."""
    from generator.config import GeneratorConfig, build_generator
    from retriever.eval_strategy import EvalStrategyConfig, format_eval, run_eval, write_results

    try:
        ecfg = EvalStrategyConfig(str(sni), str(library) if library else None,
                                  str(dev_library) if dev_library else None, tasks, inputs, max_new_tokens,
                                  batch_size, base_model, device, paraphrases)
        gen = build_generator(GeneratorConfig(base_model, generator=generator, checkpoint=checkpoint, device=device))
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    gen_cmds.warn_untrained(gen)
    scfg = StrategyConfig(calibration=str(calibration) if calibration else None)
    result = {"command": shlex.join(["hyperlora", *sys.argv[1:]]), **run_eval(gen, ecfg, scfg)}
    js, md = write_results(result, out_dir)
    typer.echo(format_eval(result))
    typer.echo(f"\nwrote {js} and {md}")


def bench_strategy(tasks: int = typer.Option(146, "--tasks", help="Library adapters (generated, one per task)."),
                   repeats: int = typer.Option(3, "--repeats", help="Passes over the queries."),
                   out: Path = typer.Option(Path("results/bench_strategy.json"), "--out", help="JSON output.")) -> None:
    """Latency of POST /v1/adapters' decision in-process, one description at a time: embed once, search the
    library's description keys, plan, and generate or mix when the plan needs it; by the path taken."""
    from generator.config import GeneratorConfig, build_generator
    from retriever.bench_strategy import format_bench, run_bench

    gen = build_generator(GeneratorConfig())
    gen_cmds.warn_untrained(gen)
    result = run_bench(gen, tasks, repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(format_bench(result))
    typer.echo(f"wrote {out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """`generate` gains --strategy (it replaces generator/commands.generate, which it calls for `generate`)."""
    for info in app.registered_commands:
        if info.name == "generate":
            info.callback = generate
    train_app = gen_cmds.command_group(app, "train", "Offline training jobs (GPU for full runs; --tiny on the CPU).")
    train_app.command("strategy")(train_strategy)
    eval_app = gen_cmds.command_group(app, "eval", "Evaluations: print figures and write them to results/.")
    eval_app.command("strategy")(eval_strategy)
    bench_app.command("strategy")(bench_strategy)
