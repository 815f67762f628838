"""Fanning the LoRA library out over a Ray cluster: one Ray task per chunk of tasks."""

from __future__ import annotations

from pathlib import Path

from training.config import LoraTrainConfig, TrainConfig


def train_library_on_ray(cfg: TrainConfig, lcfg: LoraTrainConfig, out: str | Path, address: str) -> list[str]:
    """Each chunk of `tasks_per_batch` tasks trains as one Ray task (1 GPU each when the cluster has GPUs).

    Every worker writes task folders atomically into the shared `out`, so resuming works as locally.
    """
    import dataclasses

    import ray

    from training.data import DEFAULT_DATA, load_split
    from training.lora_library import is_done, train_lora_library

    ray.init(address=None if address == "local" else address, ignore_reinit_error=True)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    names = [t.name for t in load_split("train", cfg.data or DEFAULT_DATA, cfg.limit_tasks)
             if not is_done(Path(out), t.name)]
    chunks = [names[i: i + lcfg.tasks_per_batch] for i in range(0, len(names), lcfg.tasks_per_batch)]
    device = "cuda" if gpus else cfg.device

    @ray.remote(num_gpus=gpus)
    def chunk_job(task_names: list[str]) -> list[str]:
        return train_lora_library(dataclasses.replace(cfg, device=device), lcfg, out, only=task_names)

    return [n for done in ray.get([chunk_job.remote(c) for c in chunks]) for n in done]
