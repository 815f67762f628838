"""`hyperlora train ...` and `hyperlora eval quality|report`: the offline jobs from the command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from generator.commands import command_group
from generator.models import DEFAULT_BASE_MODEL, hyperlora_home
from training.config import HypernetTrainConfig

BaseOpt = typer.Option(DEFAULT_BASE_MODEL, "--base-model", help="Embedded default, a local HF dir, or a dir with "
                                                               "one .gguf.")
DataOpt = typer.Option(None, "--data", help="SNI data dir (manifest.json + tasks/). Default: ../shared/data/sni.")
DevOpt = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda.")
DtypeOpt = typer.Option("float32", "--dtype", help="Base model weights: float32 or bfloat16 (GPU).")
LimitOpt = typer.Option(None, "--limit-tasks", help="Use only the first N tasks of the split.")
TinyOpt = typer.Option(False, "--tiny", help="A 2-layer random Llama, 3 tasks and a few steps: a CPU smoke run.")
EmbOpt = typer.Option(None, "--embeddings", help="Task-embedding file (safetensors); computed and saved if missing.")


def _train_cfg(base_model, data, device, dtype, limit_tasks, tiny):
    from training.config import TrainConfig
    from training.tiny import make_tiny_model_dir

    try:
        if tiny:
            base_model = str(make_tiny_model_dir(hyperlora_home() / "tiny-llama"))
            return TrainConfig(base_model=base_model, data=data, device=device, limit_tasks=limit_tasks or 3,
                               max_prompt_tokens=64, max_answer_tokens=16)
        return TrainConfig(base_model=base_model, data=data, device=device, dtype=dtype, limit_tasks=limit_tasks)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _lora_cfg(tiny: bool, **fields):
    from training.config import LoraTrainConfig

    fields = {k: v for k, v in fields.items() if v is not None}
    if tiny:
        fields = {"steps": 4, "per_task": 2, "tasks_per_batch": 2, "snapshots": 2, "snapshot_every": 1} | fields
    try:
        return LoraTrainConfig(**fields)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def lora_library(
    out: Path = typer.Option(Path("runs/lora-library"), "--out", help="Library directory (one folder per task)."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps per task (default 100)."),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default 1e-3)."),
    per_task: int = typer.Option(None, "--per-task", help="Examples of each task per step (default 8)."),
    tasks_per_batch: int = typer.Option(None, "--tasks-per-batch", help="Tasks trained together in one batched "
                                                                        "forward (default 146)."),
    rank: int = typer.Option(None, "--rank", help="LoRA rank (default 8)."),
    targets: str = typer.Option("q_proj,v_proj", "--targets", help="Comma-separated target modules."),
    ray_address: str = typer.Option(None, "--ray", help="Fan out over a Ray cluster ('auto' or an address): one "
                                                        "Ray task per chunk of tasks, 1 GPU each when the cluster "
                                                        "has GPUs."),
    base_model: str = BaseOpt, data: str = DataOpt, device: str = DevOpt, dtype: str = DtypeOpt,
    limit_tasks: int = LimitOpt, tiny: bool = TinyOpt,
) -> None:
    """Train one LoRA per train task (skipping tasks already in OUT), many tasks per batched forward."""
    from training.lora_library import train_lora_library

    cfg = _train_cfg(base_model, data, device, dtype, limit_tasks, tiny)
    lcfg = _lora_cfg(tiny, steps=steps, lr=lr, per_task=per_task, tasks_per_batch=tasks_per_batch, rank=rank,
                     target_modules=tuple(targets.split(",")))
    if ray_address:
        from training.distributed import train_library_on_ray

        done = train_library_on_ray(cfg, lcfg, out, ray_address)
    else:
        done = train_lora_library(cfg, lcfg, out)
    typer.echo(f"trained {len(done)} task LoRA(s) into {out}" + ("" if done else " (all tasks were already done)"))


def multitask_lora(
    out: Path = typer.Option(Path("runs/multitask"), "--out", help="PEFT directory to write."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default 100)."),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default 1e-3)."),
    batch: int = typer.Option(None, "--batch", help="Examples per step, mixed over all tasks (default 8)."),
    holdout: int = typer.Option(0, "--holdout", help="Leave out the train tasks that `train hypernet --val-tasks "
                                                     "N` holds out (same N): the base for a residual hypernetwork."),
    base_model: str = BaseOpt, data: str = DataOpt, device: str = DevOpt, dtype: str = DtypeOpt,
    limit_tasks: int = LimitOpt, tiny: bool = TinyOpt,
) -> None:
    """Train the multi-task baseline: one LoRA on every train task's examples mixed."""
    from training.lora_library import train_multitask

    cfg = _train_cfg(base_model, data, device, dtype, limit_tasks, tiny)
    try:
        path = train_multitask(cfg, _lora_cfg(tiny, steps=steps, lr=lr, per_task=batch), out, holdout=holdout)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"wrote the multi-task LoRA to {path}")


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise typer.BadParameter(f"--snapshot-steps takes comma-separated step numbers, got {text!r}") from e


def hypernet(
    mode: str = typer.Option("sft", "--mode", help="recon: fit the library's adapters; sft: train end to end "
                                                   "through the base model."),
    out: Path = typer.Option(None, "--out", help="Checkpoint directory (default runs/t2l-MODE)."),
    library: str = typer.Option("runs/lora-library", "--library", help="LoRA library (recon)."),
    variant: str = typer.Option("M", "--variant", help="Hypernetwork size: L, M or S."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default 3000 recon, 1000 sft)."),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default 1e-3 recon, 2e-4 sft)."),
    tasks_per_step: int = typer.Option(32, "--tasks-per-step", help="Tasks per step, one sampled description each."),
    init_from: str = typer.Option(None, "--init-from", help="Start from this checkpoint (e.g. a recon one)."),
    base_adapter: str = typer.Option(None, "--base-adapter", help="SFT: a LoRA directory (e.g. `train multitask-lora "
                                     "--holdout N`) that every generated adapter holds as fixed leading ranks; the "
                                     "network learns a task residual on top of it."),
    val_tasks: int = typer.Option(0, "--val-tasks", help="SFT: hold out this many train tasks and keep the step "
                                                         "with the lowest loss on them (0: keep the last step)."),
    eval_every: int = typer.Option(100, "--eval-every", help="SFT: steps between validation losses."),
    dropout: float = typer.Option(0.05, "--dropout", help="Hypernetwork dropout."),
    embed_noise: float = typer.Option(0.0, "--embed-noise", help="Std of Gaussian noise on each sampled description "
                                                                 "embedding in training (0: none)."),
    weight_decay: float = typer.Option(1e-2, "--weight-decay", help="AdamW weight decay."),
    ema: float = typer.Option(0.0, "--ema", help="Decay of a moving average of the network's weights, validated and "
                                                 "saved instead of the last step's (e.g. 0.99; 0: off)."),
    mismatch_rate: float = typer.Option(0.0, "--mismatch-rate", help="SFT: share of a step's tasks whose adapter is "
                                        "generated from a description of one of their nearest other train tasks, "
                                        "the prompt staying their own: adapters learn to follow the prompt, as an "
                                        "unseen task's imperfect adapter must (0: off)."),
    example_rate: float = typer.Option(HypernetTrainConfig.example_rate, "--example-rate",
                                       help="SFT: share of samples with one or two of the task's positive examples "
                                            "as earlier chat turns."),
    relabel_copies: int = typer.Option(0, "--relabel-copies", help="SFT: also train on up to this many relabelled "
                                       "copies of each qualifying classification task (other answer words, which "
                                       "only the instruction gives), so adapters take answer words from the "
                                       "prompt (0: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling and (unless --init-seed) the initialisation; "
                                               "another seed of one recipe shows how much of a result is the draw."),
    init_seed: int = typer.Option(None, "--init-seed", help="Seed of the network's initialisation alone; runs with "
                                  "one --init-seed and several --seed values can be averaged "
                                  "(`python -m training.average`)."),
    snapshot_steps: str = typer.Option("", "--snapshot-steps", help="Also save the network after these steps "
                                       "(comma-separated, e.g. 300,350) into OUT/../snapshots/NAME-stepN."),
    ray_workers: int = typer.Option(0, "--ray-workers", help="SFT data-parallel on this many Ray Train workers "
                                                             "(a GPU each when there are enough); 0: one process."),
    ray_address: str = typer.Option(None, "--ray", help="With --ray-workers: a running Ray cluster ('auto' or an "
                                                        "address); default: start a local one."),
    embeddings: str = EmbOpt, base_model: str = BaseOpt, data: str = DataOpt, device: str = DevOpt,
    dtype: str = DtypeOpt, limit_tasks: int = LimitOpt, tiny: bool = TinyOpt,
) -> None:
    """Train a Text-to-LoRA hypernetwork (recon or SFT) on the train tasks."""
    from training.hypernet_train import train_hypernet

    cfg = replace(_train_cfg(base_model, data, device, dtype, limit_tasks, tiny), seed=seed)
    recon = mode == "recon"
    fields = {"mode": mode, "variant": variant, "steps": steps or (3000 if recon else 1000),
              "lr": lr or (1e-3 if recon else 2e-4), "tasks_per_step": tasks_per_step, "val_tasks": val_tasks,
              "eval_every": eval_every, "dropout": dropout, "embed_noise": embed_noise, "weight_decay": weight_decay,
              "base_adapter": base_adapter if not recon else None, "ema": ema,
              "mismatch_rate": mismatch_rate, "example_rate": example_rate, "relabel_copies": relabel_copies,
              "init_seed": init_seed, "snapshot_steps": _steps(snapshot_steps)}
    if tiny:
        fields |= {"steps": steps or 4, "tasks_per_step": 2, "per_task": 2, "hidden_dim": 32, "warmup": 1,
                   "eval_every": min(eval_every, 2)}
    try:
        hcfg = HypernetTrainConfig(**fields)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    out = out or Path(f"runs/t2l-{mode}")
    if ray_workers > 0:
        from training.distributed import train_hypernet_on_ray

        try:
            path = train_hypernet_on_ray(cfg, hcfg, out, ray_workers, ray_address, embeddings, init_from)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
    else:
        path = train_hypernet(cfg, hcfg, out, embeddings, library, init_from)
    typer.echo(f"wrote the {mode} hypernetwork checkpoint to {path}")


def embed_tasks(out: Path = typer.Option(Path("runs/embeddings.safetensors"), "--out"),
                max_descriptions: int = typer.Option(128, "--max-descriptions", help="Paraphrases embedded per task."),
                data: str = DataOpt) -> None:
    """Embed every task's descriptions and definition once (the GPU machine has no embedder)."""
    from generator.encoder import TaskEncoder
    from training.data import DEFAULT_DATA, load_split
    from training.embeddings import embed_tasks as embed
    from training.embeddings import save_embeddings

    tasks = load_split("train", data or DEFAULT_DATA) + load_split("dev", data or DEFAULT_DATA)
    emb = embed(tasks, TaskEncoder.load(), max_descriptions)
    save_embeddings({k: v.half() for k, v in emb.items()}, out)
    typer.echo(f"wrote {len(emb)} embeddings for {len(tasks)} tasks to {out}")


def quality(
    work: Path = typer.Option(Path("runs"), "--work", help="Where the training jobs wrote lora-library/, "
                                                          "multitask/, t2l-recon/, t2l-sft/."),
    out: Path = typer.Option(Path("results"), "--out", help="Where quality.{json,md,png} go."),
    generator: list[str] = typer.Option(None, "--generator", help="Extra rows NAME=KIND:CHECKPOINT "
                                                                  "(e.g. cvae=cvae:runs/cvae)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    batch_size: int = typer.Option(64, "--batch-size"),
    max_per_task: int = typer.Option(None, "--max-per-task", help="Cap test instances per task."),
    train_sample: int = typer.Option(16, "--train-sample", help="Train tasks for oracle vs generated."),
    embeddings: str = EmbOpt, base_model: str = BaseOpt, data: str = DataOpt, device: str = DevOpt,
    dtype: str = DtypeOpt, limit_tasks: int = LimitOpt, tiny: bool = TinyOpt,
) -> None:
    """Evaluate baselines and generated adapters on held-out dev tasks; write results/quality.*."""
    import shlex
    import sys

    from training.evaluate import EvalConfig, predict
    from training.report import write_report

    cfg = _train_cfg(base_model, data, device, dtype, limit_tasks, tiny)
    hypernets = {d.name: str(d) for d in sorted(work.glob("t2l-*")) if (d / "hypernet.json").exists()}
    gens = dict(g.split("=", 1) for g in generator or [])
    ecfg = EvalConfig(max_new_tokens=4 if tiny else max_new_tokens, batch_size=batch_size,
                      max_per_task=max_per_task or (2 if tiny else None), train_sample=2 if tiny else train_sample,
                      hypernets=hypernets, generators=gens,
                      multitask=str(work / "multitask") if (work / "multitask").is_dir() else None,
                      library=str(work / "lora-library") if (work / "lora-library").is_dir() else None)
    command = "hyperlora eval quality " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    pred = predict(cfg, ecfg, out / "predictions.json", embeddings, command)
    _print(write_report(pred, out))


def report(predictions: Path = typer.Argument(..., help="predictions.json from `eval quality` or the pipeline."),
           out: Path = typer.Option(Path("results"), "--out"),
           note: str = typer.Option("", "--note", help="Provenance text written under the command.")) -> None:
    """Score a predictions file (ROUGE-L, exact match) into quality.{json,md,png}."""
    from training.report import write_report

    if not predictions.is_file():
        raise typer.BadParameter(f"{predictions} does not exist")
    _print(write_report(predictions, out, note))


def _print(q: dict) -> None:
    from training.report import _order

    for split, res in q["results"].items():
        typer.echo(f"[{split}] method: ROUGE-L [95% CI] / exact match / harmed tasks")
        for m in _order(res):
            r = res[m]
            lo, hi = r["rougeL_ci"]
            harm = f"  harms {len(r['harmed'])}/{len(r['delta'])}" if "harmed" in r else ""
            typer.echo(f"  {m:<52} {r['rougeL']:5.1f} [{lo:5.1f}, {hi:5.1f}] {r['exact_match']:5.1f}  "
                       f"({r['tasks']} tasks){harm}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    train = command_group(app, "train", "Offline training jobs (GPU for full runs; --tiny on the CPU).")
    train.command("lora-library")(lora_library)
    train.command("multitask-lora")(multitask_lora)
    train.command("hypernet")(hypernet)
    train.command("embed-tasks")(embed_tasks)
    ev = command_group(app, "eval", "Evaluations: print figures and write them to results/.")
    ev.command("quality")(quality)
    ev.command("report")(report)
