"""Scaling the offline jobs out on Ray: the LoRA library as one Ray task per chunk of tasks, and hypernetwork SFT
data-parallel with Ray Train (one worker per GPU, gradients averaged by DDP)."""

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


def train_hypernet_on_ray(cfg: TrainConfig, hcfg, out: str | Path, workers: int, address: str | None = None,
                          embeddings: str | None = None, init_from: str | None = None) -> Path:
    """SFT on `workers` Ray Train workers (a GPU each when the cluster has enough, else CPU processes with gloo).

    Each worker runs `train_hypernet` with its rank; DDP averages the gradients, so a step sees
    `workers x tasks_per_step` tasks. Rank 0 validates and writes the checkpoint into `out` (shared storage).
    """
    import dataclasses

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if hcfg.mode != "sft":
        raise ValueError("only SFT runs data-parallel; recon fits the library in seconds on one device")
    started = not ray.is_initialized()
    ray.init(address=None if address in (None, "local") else address, ignore_reinit_error=True)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    out = Path(out).resolve()
    job = {"cfg": dataclasses.asdict(cfg), "hcfg": dataclasses.asdict(hcfg), "out": str(out),
           "embeddings": str(Path(embeddings).resolve()) if embeddings else None,
           "init_from": str(Path(init_from).resolve()) if init_from else None}
    trainer = TorchTrainer(_sft_worker, train_loop_config=job,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                           run_config=RunConfig(name="hypernet-sft", storage_path=str(out.parent / ".ray-train")))
    try:
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return out


def _sft_worker(job: dict) -> None:
    import ray.train
    import ray.train.torch

    from training.config import HypernetTrainConfig
    from training.hypernet_train import train_hypernet

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    cfg = TrainConfig(**{**job["cfg"], "device": str(device)})
    hcfg = HypernetTrainConfig(**job["hcfg"])
    train_hypernet(cfg, hcfg, job["out"], job["embeddings"], init_from=job["init_from"],
                   rank=ctx.get_world_rank(), world=ctx.get_world_size(), wrap=ray.train.torch.prepare_model)
