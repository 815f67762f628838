"""`hyperlora train cvae`, `hyperlora train sg` and `hyperlora train embed-examples`.

They join the `train` group that training/commands.py creates (or create it when that module is absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

LibOpt = typer.Option("runs/lora-library", "--library", help="LoRA library dir (`hyperlora train lora-library`).")
EmbOpt = typer.Option(None, "--embeddings", help="Task embeddings safetensors; missing entries are computed and "
                                                 "saved there (needed on a machine without the embedder).")
DataOpt = typer.Option(None, "--data", help="SNI data dir: condition also on each task's positive examples "
                                            "(ICM-LoRA's in-context vector). Default: descriptions only.")
StepsOpt = typer.Option(None, "--steps", help="Optimizer steps (default 4000; 20 with --tiny).")
BatchOpt = typer.Option(64, "--batch-size", help="Library snapshots per step.")
LrOpt = typer.Option(3e-3, "--lr", help="Peak learning rate (warm-up, then cosine).")
BetaOpt = typer.Option(1e-3, "--beta", help="KL weight.")
DevOpt = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda.")
TinyOpt = typer.Option(False, "--tiny", help="Test-size model and a few steps (CPU smoke runs).")
SeedOpt = typer.Option(0, "--seed")
SizeOpt = typer.Option("default", "--size", help="CVAE widths: default or large (ignored with --tiny).")


def _run(cfg) -> None:
    from training.cvae import train

    out = train(cfg)
    report = json.loads((out / "report.json").read_text())
    ratio = report["checkpoint_over_library_final"]
    typer.echo(f"wrote {out}: {report['checkpoint_bytes'] / 2**20:.2f} MiB"
               + (f" = {100 * ratio:.2f}% of the library's final adapters "
                  f"({report['library_final_bytes'] / 2**20:.1f} MiB)" if ratio else "")
               + f"; final losses {report['final']}")


def _config(cls, tiny: bool, steps: int | None, **fields):
    from training.cvae import TINY_STEPS
    from training.cvae import tiny as make_tiny

    try:
        cfg = cls(steps=steps or (TINY_STEPS if tiny else cls.steps), **fields)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    return make_tiny(cfg) if tiny else cfg


def cvae(library: str = LibOpt, out: str = typer.Option("runs/cvae", "--out", help="Checkpoint directory."),
         embeddings: str | None = EmbOpt, data: str | None = DataOpt, steps: int | None = StepsOpt,
         batch_size: int = BatchOpt, lr: float = LrOpt, beta: float = BetaOpt, size: str = SizeOpt,
         device: str = DevOpt, tiny: bool = TinyOpt, seed: int = SeedOpt) -> None:
    """Train the conditional-VAE generator (ICM-LoRA) on the LoRA library's snapshots."""
    from training.cvae import CVAETrainConfig

    _run(_config(CVAETrainConfig, tiny, steps, library=library, out=out, embeddings=embeddings, data=data,
                 batch_size=batch_size, lr=lr, beta=beta, size=size, device=device, seed=seed))


def sg(library: str = LibOpt, out: str = typer.Option("runs/sg", "--out", help="Checkpoint directory."),
       embeddings: str | None = EmbOpt, data: str | None = DataOpt, steps: int | None = StepsOpt,
       batch_size: int = BatchOpt, lr: float = LrOpt, beta: float = BetaOpt,
       top_k: int = typer.Option(5, "--top-k", help="Library experts mixed into one semantic prior."),
       temperature: float = typer.Option(0.05, "--temperature", help="Softmax temperature over cosine similarity."),
       size: str = SizeOpt, device: str = DevOpt, tiny: bool = TinyOpt, seed: int = SeedOpt) -> None:
    """Train the semantic-guided generator (SG-LoRA): the CVAE with a prior from the nearest library experts."""
    from training.cvae import SGTrainConfig

    _run(_config(SGTrainConfig, tiny, steps, library=library, out=out, embeddings=embeddings, data=data,
                 batch_size=batch_size, lr=lr, beta=beta, top_k=top_k, temperature=temperature, size=size,
                 device=device, seed=seed))


def embed_examples(data: str = typer.Option(..., "--data", help="SNI data dir (manifest.json + tasks/)."),
                   embeddings: str = typer.Option(..., "--embeddings", help="Safetensors file to add keys to."),
                   n: int = typer.Option(2, "--n", help="Positive examples per task.")) -> None:
    """Add every SNI task's description and "{task}::examples" embeddings to a file (run where the embedder is)."""
    from generator.encoder import TaskEncoder
    from generator.library_data import library_embeddings, sni_examples

    manifest = json.loads((Path(data) / "manifest.json").read_text())
    tasks = [t for split in ("train", "dev") for t in manifest.get(split, [])]
    raw = {t: json.loads((Path(data) / "tasks" / f"{t}.json").read_text()) for t in tasks}
    descriptions = {t: r["descriptions"] or [r["definition"]] for t, r in raw.items()}
    emb = library_embeddings(descriptions, embeddings, TaskEncoder.load, sni_examples(data, tasks, n))
    typer.echo(f"{embeddings}: {len(emb)} keys for {len(tasks)} tasks")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add the commands to the existing `train` group, creating it when no other module did."""
    from generator.commands import command_group

    group = command_group(app, "train", "Offline training jobs (GPU for full runs; --tiny on the CPU).")
    group.command("cvae")(cvae)
    group.command("sg")(sg)
    group.command("embed-examples")(embed_examples)
