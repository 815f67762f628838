"""`train lora-library` (one LoRA per task, many tasks per batched forward) and `train multitask-lora`.

Output, one folder per task: a PEFT directory (adapter_config.json + adapter_model.safetensors),
`meta.json` ({"task", "descriptions", "loss", "steps", ...}) and `snapshots.safetensors` (the last
checkpoints of the run: "{module}.A" `(K, L, r, d_in)`, "{module}.B" `(K, L, d_out, r)`). A task whose
folder holds meta.json is done and skipped on resume; folders are written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from generator.atomic import atomic_dir
from generator.lora import LoraAdapter
from generator.peft_io import save_peft, write_peft_files
from training.config import LoraTrainConfig, TrainConfig
from training.data import DEFAULT_DATA, Batcher, Task, load_split
from training.loop import lora_step_loss, run_steps
from training.runtime import load_frozen

logger = logging.getLogger(__name__)
META, SNAPSHOTS = "meta.json", "snapshots.safetensors"


def is_done(out: Path, task: str) -> bool:
    return (out / task / META).is_file()


def init_factors(n: int, spec, lcfg: LoraTrainConfig, device) -> tuple[dict, dict]:
    """n fresh LoRAs as parameters: A Kaiming-uniform `(n, L, r, d_in)` (shared), B zeros `(n, L, d_out, r)`."""
    a, b = {}, {}
    gen = torch.Generator().manual_seed(1234)  # every task starts from the same A: the library stays compressible
    for m in lcfg.target_modules:
        d_in, d_out = spec.shapes[m]
        bound = 1.0 / math.sqrt(d_in)
        a0 = torch.empty(spec.n_layers, lcfg.rank, d_in).uniform_(-bound, bound, generator=gen)
        a[m] = torch.nn.Parameter(a0.to(device).expand(n, -1, -1, -1).clone())
        b[m] = torch.nn.Parameter(torch.zeros(n, spec.n_layers, d_out, lcfg.rank, device=device))
    return a, b


def train_group(model, injector, batcher, tasks: Sequence[Task], lcfg: LoraTrainConfig, spec, device, seed: int,
                desc: str, per_task: int) -> tuple[dict, dict, list[float], list[tuple[dict, dict]]]:
    """Train one LoRA per entry of `tasks` together; returns factors, losses and the last snapshots."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    a, b = init_factors(len(tasks), spec, lcfg, device)
    scaling = lcfg.alpha / lcfg.rank
    ids = list(range(len(tasks)))
    snaps: list[tuple[dict, dict]] = []
    first_snap = lcfg.steps - lcfg.snapshots * lcfg.snapshot_every

    def factors(task_ids):
        return {m: t[task_ids] for m, t in a.items()}, {m: t[task_ids] for m, t in b.items()}

    def on_step(step, _loss):
        if step >= first_snap and (step + 1 - first_snap) % lcfg.snapshot_every == 0:
            snaps.append(({m: t.detach().to("cpu", copy=True) for m, t in a.items()},
                          {m: t.detach().to("cpu", copy=True) for m, t in b.items()}))

    losses = run_steps([*a.values(), *b.values()], lcfg.steps, lcfg.lr,
                       lambda s: lora_step_loss(model, injector, batcher, tasks, ids, factors, scaling, per_task, rng,
                                                device),
                       desc=desc, warmup=min(10, lcfg.steps // 10), on_step=on_step)
    return a, b, losses, snaps


def write_task(out: Path, task: Task, adapter: LoraAdapter, meta: dict, snaps: list[tuple[dict, dict]],
               index: int) -> None:
    """One task's folder, atomically: PEFT files, meta.json, snapshots.safetensors."""
    with atomic_dir(out / task.name) as tmp:
        write_peft_files(adapter, tmp)
        if snaps:
            stacked = {}
            for m in adapter.target_modules:
                stacked[f"{m}.A"] = torch.stack([s[0][m][index] for s in snaps]).contiguous()  # (K, L, r, d_in)
                stacked[f"{m}.B"] = torch.stack([s[1][m][index] for s in snaps]).contiguous()  # (K, L, d_out, r)
            save_file(stacked, str(tmp / SNAPSHOTS))
        (tmp / META).write_text(json.dumps(meta, indent=2))


def train_lora_library(cfg: TrainConfig, lcfg: LoraTrainConfig, out_dir: str | Path, split: str = "train",
                       only: list[str] | None = None) -> list[str]:
    """Train the missing tasks' LoRAs (all of `split`, or `only` these), `tasks_per_batch` at a time."""
    out = Path(out_dir)
    tasks = load_split(split, cfg.data or DEFAULT_DATA, cfg.limit_tasks)
    if only is not None:
        tasks = [t for t in tasks if t.name in set(only)]
    todo = [t for t in tasks if not is_done(out, t.name)]
    if len(todo) < len(tasks):
        logger.warning("resuming: %d of %d tasks already trained in %s", len(tasks) - len(todo), len(tasks), out)
    if not todo:
        return []
    model, tok, spec, injector = load_frozen(cfg, lcfg.target_modules)
    batcher = Batcher(tok, cfg.max_prompt_tokens, cfg.max_answer_tokens)
    done = []
    for start in range(0, len(todo), lcfg.tasks_per_batch):
        chunk = todo[start: start + lcfg.tasks_per_batch]
        a, b, losses, snaps = train_group(model, injector, batcher, chunk, lcfg, spec, cfg.device, cfg.seed + start,
                                          f"lora-library {start + len(chunk)}/{len(todo)}", lcfg.per_task)
        for i, task in enumerate(chunk):
            adapter = LoraAdapter(spec.name, lcfg.rank, lcfg.alpha, {m: t[i].detach().cpu() for m, t in a.items()},
                                  {m: t[i].detach().cpu() for m, t in b.items()},
                                  metadata={"instruction": task.definition, "task": task.name})
            meta = {"task": task.name, "descriptions": task.descriptions, "loss": sum(losses[-10:]) / len(losses[-10:]),
                    "steps": lcfg.steps, "lr": lcfg.lr, "rank": lcfg.rank, "target_modules": list(lcfg.target_modules),
                    "note": "loss is the batch mean over the tasks trained together"}
            write_task(out, task, adapter, meta, snaps, i)
            done.append(task.name)
    return done


def train_multitask(cfg: TrainConfig, lcfg: LoraTrainConfig, out_dir: str | Path, split: str = "train",
                    holdout: int = 0) -> Path:
    """One LoRA on all `split` tasks mixed (each step `per_task` samples, each of a task drawn uniformly, with
    that task's definition as the instruction); written as a PEFT directory with meta.json. `holdout`: leave
    out the tasks that SFT with `val_tasks=holdout` holds out, so a residual hypernetwork on this LoRA
    (HypernetTrainConfig.base_adapter) is still chosen by tasks nothing was trained on."""
    from training.hypernet_train import split_val

    tasks, held = split_val(load_split(split, cfg.data or DEFAULT_DATA, cfg.limit_tasks), holdout)
    exclude = [t.name for t in held]
    model, tok, spec, injector = load_frozen(cfg, lcfg.target_modules)
    batcher = Batcher(tok, cfg.max_prompt_tokens, cfg.max_answer_tokens)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    a, b = init_factors(1, spec, lcfg, device=cfg.device)
    scaling = lcfg.alpha / lcfg.rank

    def shared(task_ids):  # the one adapter for every sample: (1, ...) viewed as (n, ...)
        n = len(task_ids)
        return ({m: t.expand(n, *t.shape[1:]) for m, t in a.items()},
                {m: t.expand(n, *t.shape[1:]) for m, t in b.items()})

    def loss_fn(_step):
        ids = [rng.randrange(len(tasks)) for _ in range(lcfg.per_task)]
        return lora_step_loss(model, injector, batcher, tasks, ids, shared, scaling, 1, rng, cfg.device)

    losses = run_steps([*a.values(), *b.values()], lcfg.steps, lcfg.lr, loss_fn, "multitask-lora",
                       warmup=min(10, lcfg.steps // 10))
    adapter = LoraAdapter(spec.name, lcfg.rank, lcfg.alpha, {m: t[0].detach().cpu() for m, t in a.items()},
                          {m: t[0].detach().cpu() for m, t in b.items()})
    out = Path(out_dir)
    save_peft(adapter, out)
    (out / META).write_text(json.dumps({"task": "multitask", "tasks": [t.name for t in tasks],
                                        "excluded": sorted(exclude), "steps": lcfg.steps,
                                        "loss": sum(losses[-10:]) / len(losses[-10:])}, indent=2))
    return out
