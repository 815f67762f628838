"""`hyperlora bench generate`: hypernetwork size and adapter-generation latency, embedding included."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import typer

from generator.models import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER

TARGET_MS_PER_ADAPTER = 20.0  # the target: p50 per adapter at batch 32, on the CPU
VARIANTS = ("L", "M", "S")

# Varied task descriptions of realistic length (8-20 words), one per adapter of the largest batch.
DESCRIPTIONS = [
    "Translate English sentences into formal French.",
    "Answer grade-school maths word problems step by step and give the final number.",
    "Classify the sentiment of a movie review as positive or negative.",
    "Summarise a news article in two sentences.",
    "Extract every person and organisation named in the text.",
    "Rewrite the paragraph in plain English for a ten-year-old reader.",
    "Decide whether the second sentence follows from the first.",
    "Answer trivia questions about world geography with a single word.",
    "Write a polite reply to a customer complaint about a late delivery.",
    "Convert a natural-language request into a SQL query over the given table.",
    "Correct the grammar and spelling of the input sentence.",
    "Give the antonym of the given English word.",
    "Classify a support ticket as billing, technical, or account related.",
    "Generate a short title for the given scientific abstract.",
    "Answer yes or no: is the question answerable from the passage?",
    "Translate German product descriptions into English.",
    "Detect whether a tweet is sarcastic.",
    "List the ingredients mentioned in a recipe.",
    "Explain what a Python function does in one sentence.",
    "Pick the option that best completes the story.",
    "Turn bullet points into a coherent paragraph.",
    "Identify the language of the given text.",
    "Answer questions about a patient's discharge note using only the note.",
    "Paraphrase the sentence without changing its meaning.",
    "Rate how toxic a comment is on a scale from one to five.",
    "Solve simple logic puzzles about who sits where.",
    "Write a haiku about the topic given by the user.",
    "Find the date of the event described in the text.",
    "Classify a news headline into politics, sport, business, or science.",
    "Answer multiple-choice science questions with the letter of the correct option.",
    "Summarise a customer review into pros and cons.",
    "Split a compound sentence into simple sentences.",
]


def _machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # >cpu_count: shared
    }


def _generator(variant: str, spec, encoder, shipped: Path | None):
    """The shipped checkpoint when it is this variant, else a fresh hypernetwork (latency ignores training)."""
    from generator.generate import T2LGenerator
    from generator.hypernet.checkpoint import CONFIG_FILE

    if shipped is not None and json.loads((shipped / CONFIG_FILE).read_text()).get("variant") == variant:
        return T2LGenerator.from_checkpoint(shipped, encoder, spec), f"shipped checkpoint {shipped.name}"
    return T2LGenerator.fresh(spec, encoder, variant=variant, target_modules=("q_proj", "v_proj"), rank=8), "fresh"


def _latencies(gen, descriptions: list[str], repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU ms of `gen.generate(descriptions)` (embedding + hypernetwork + unpacking).

    CPU time sums all threads; beside wall time it shows how much of a slow run was waiting for a CPU that
    other processes held.
    """
    for _ in range(warmup):
        gen.generate(descriptions)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        gen.generate(descriptions)
        wall.append(1e3 * (time.perf_counter() - t0))
        cpu.append(1e3 * (time.process_time() - c0))
    return wall, cpu


def _percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def bench_generate(
    repeats: int = typer.Option(20, min=1, help="Timed runs per batch size."),
    warmup: int = typer.Option(3, min=0, help="Untimed runs first."),
    batch_sizes: str = typer.Option("1,32", help="Comma-separated numbers of descriptions per call."),
    variants: str = typer.Option(",".join(VARIANTS), help="Comma-separated hypernetwork sizes to time."),
    threads: int | None = typer.Option(None, min=1, help="torch intra-op threads (default: torch's choice)."),
    base_model: str = typer.Option(DEFAULT_BASE_MODEL, "--base-model"),
    embedder: str = typer.Option(DEFAULT_EMBEDDER, "--embedder"),
    out: Path = typer.Option(Path("results/bench_generate.json"), "--out", help="Where to write the JSON."),
) -> None:
    """Print hypernetwork parameter counts per variant and p50/p90 generation latency; write them as JSON."""
    import torch  # here: the `hyperlora` command starts without it (`hyperlora serve` never needs it)

    from generator.config import load_spec
    from generator.encoder import TaskEncoder
    from generator.generate import default_checkpoint

    sizes = [int(s) for s in batch_sizes.split(",")]
    names = [v.strip().upper() for v in variants.split(",")]
    bad = [v for v in names if v not in VARIANTS] + [str(n) for n in sizes if n < 1]
    if bad:
        raise typer.BadParameter(f"unknown variant(s) or batch size(s) {bad}; variants: {list(VARIANTS)}")
    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(base_model)
    encoder = TaskEncoder.load(embedder)
    shipped = default_checkpoint() if base_model == DEFAULT_BASE_MODEL else None
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": _machine(),
              "base_model": spec.name, "embedder": encoder.name, "repeats": repeats, "warmup": warmup,
              "target_ms_per_adapter_at_32": TARGET_MS_PER_ADAPTER, "variants": {}}
    typer.echo(f"{spec.name}, embedder {encoder.name}, {torch.get_num_threads()} torch thread(s), "
               f"{repeats} timed runs after {warmup} warm-up")
    for variant in names:
        gen, source = _generator(variant, spec, encoder, shipped)
        cfg = gen.net.cfg
        entry = {"params": sum(p.numel() for p in gen.net.parameters()), "source": source, "rank": cfg.rank,
                 "target_modules": list(cfg.target_modules), "latency_ms": {}}
        typer.echo(f"{variant}: {entry['params']:,} hypernet params ({source}; {', '.join(cfg.target_modules)}, "
                   f"r={cfg.rank})")
        for n in sizes:
            descriptions = [DESCRIPTIONS[i % len(DESCRIPTIONS)] for i in range(n)]
            times, cpu = _latencies(gen, descriptions, repeats, warmup)
            p50, p90, cpu50 = statistics.median(times), _percentile(times, 90), statistics.median(cpu)
            entry["latency_ms"][str(n)] = {"p50": round(p50, 2), "p90": round(p90, 2),
                                           "per_adapter_p50": round(p50 / n, 2), "per_adapter_p90": round(p90 / n, 2),
                                           "cpu_p50": round(cpu50, 2)}
            typer.echo(f"  batch {n:>3}: p50 {p50:8.1f} ms  p90 {p90:8.1f} ms  per adapter p50 {p50 / n:6.2f} ms"
                       f"  p90 {p90 / n:6.2f} ms  (process CPU p50 {cpu50:.1f} ms)")
        if "32" in entry["latency_ms"]:
            per = entry["latency_ms"]["32"]["per_adapter_p50"]
            entry["meets_target"] = per < TARGET_MS_PER_ADAPTER
            typer.echo(f"  target p50 < {TARGET_MS_PER_ADAPTER:.0f} ms per adapter at batch 32: "
                       f"{'met' if entry['meets_target'] else 'MISSED'} ({per:.2f} ms)")
        report["variants"][variant] = entry
    report["machine"]["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"wrote {out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("generate")(bench_generate)
