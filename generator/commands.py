"""`hyperlora generate`, `hyperlora info`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

from generator.config import GeneratorConfig, build_generator, load_spec
from generator.models import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER, resolve_base_model

logger = logging.getLogger(__name__)

BaseOpt = typer.Option(DEFAULT_BASE_MODEL, "--base-model", help="Embedded default or a local HF model directory.")
EmbOpt = typer.Option(DEFAULT_EMBEDDER, "--embedder", help="Embedded default or a local sentence-transformers dir.")
CkptOpt = typer.Option(None, "--checkpoint", help="Generator checkpoint dir (default: the shipped one).")
GenOpt = typer.Option("t2l", "--generator",
                      help="Which generator: t2l (Text-to-LoRA), cvae (ICM-LoRA CVAE), sg (semantic-guided).")
DevOpt = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda.")


def warn_untrained(gen) -> None:
    if not gen.trained:
        typer.secho("WARNING: no trained checkpoint found: using a FRESHLY INITIALISED hypernetwork. Its adapters "
                    "are well-formed but carry no task knowledge. Train one with `hyperlora train hypernet`.",
                    fg=typer.colors.RED, bold=True, err=True)


def build_or_fail(description: str, checkpoint: str | None, generator: str, base_model: str, embedder: str,
                  device: str):
    """The generator the options name, after refusing an empty description (before loading any model)."""
    from generator.encoder import check_texts

    try:
        check_texts([description])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="DESCRIPTION") from e
    try:
        gen = build_generator(GeneratorConfig(base_model, embedder, generator, checkpoint, device))
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    warn_untrained(gen)
    return gen


def generate(
    description: str = typer.Argument(..., help="What the adapter should make the model do, in one sentence."),
    out: Path = typer.Option(Path("adapter"), "--out", "-o", help="Directory to write the PEFT adapter to."),
    checkpoint: str | None = CkptOpt, generator: str = GenOpt, base_model: str = BaseOpt, embedder: str = EmbOpt,
    device: str = DevOpt,
) -> None:
    """Generate a LoRA adapter from a task description and write it as a PEFT directory."""
    from generator.peft_io import save_peft

    gen = build_or_fail(description, checkpoint, generator, base_model, embedder, device)
    t0 = time.perf_counter()
    try:
        (adapter,) = gen.generate([description])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="DESCRIPTION") from e
    ms = 1e3 * (time.perf_counter() - t0)
    save_peft(adapter, out)
    typer.echo(f"generated a rank-{adapter.rank} LoRA on {', '.join(adapter.target_modules)} "
               f"({adapter.num_params():,} params) in {ms:.1f} ms -> {out}")
    typer.echo(prompting_hint(description))


def prompting_hint(instruction: str) -> str:
    """How to prompt a generated adapter: it complements its instruction (generator.prompt), it does not replace it."""
    from generator.peft_io import SIDECAR_NAME
    from generator.prompt import user_turn

    example = user_turn(instruction, "<your input>").replace("\n", "\\n")
    return (f"prompt it with its instruction in front of each input, in the user turn of the chat template:\n"
            f"  {example!s}\n"
            f"(the instruction is saved in {SIDECAR_NAME} beside the PEFT files; hyperlora serve puts it in front "
            "for you, and generator.prompt.task_prompt builds the whole prompt)")


def info(checkpoint: str | None = CkptOpt, generator: str = GenOpt, base_model: str = BaseOpt,
         embedder: str = EmbOpt) -> None:
    """Show the base model, target modules, adapter size and the generator's parameter count."""
    try:
        cfg = GeneratorConfig(base_model, embedder, generator, checkpoint)
        spec = load_spec(base_model)
        gen = build_generator(cfg, spec)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    warn_untrained(gen)
    params = sum(p.numel() for p in gen.net.parameters()) if hasattr(gen, "net") else 0
    targets = list(gen.net.cfg.target_modules) if hasattr(gen, "net") else []
    n_lora = spec.lora_params(targets, gen.rank)
    typer.echo(f"base model:      {spec.name} ({spec.n_layers} layers)")
    typer.echo(f"  local path     {resolve_base_model(base_model)}  (load the base from here for PEFT, offline)")
    for m in targets:
        typer.echo(f"  target {m:<9} d_in={spec.shapes[m][0]} d_out={spec.shapes[m][1]}")
    made_at = f" x strength {gen.strength:g} (chosen on held-out tasks)" if gen.strength != 1.0 else ""
    typer.echo(f"adapter:         rank {gen.rank}, alpha {gen.alpha}{made_at}, {n_lora:,} params "
               f"({n_lora * 4 / 2**20:.2f} MiB fp32)")
    typer.echo(f"embedder:        {gen.encoder.name} ({gen.encoder.dim}-d)")
    typer.echo(f"generator:       {gen.name} variant {getattr(gen.net.cfg, 'variant', '?')}, {params:,} params, "
               f"{'trained' if gen.trained else 'UNTRAINED (fresh init)'}")


def command_group(app: typer.Typer, name: str, help: str) -> typer.Typer:
    """The `name` sub-app of `app`: the one another package registered, or a new one (either order works)."""
    for group in app.registered_groups:
        group_name = group.name if isinstance(group.name, str) else getattr(group.typer_instance.info, "name", None)
        if group_name == name and group.typer_instance is not None:
            return group.typer_instance
    sub = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub
