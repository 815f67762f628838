"""Task-description embeddings, computed once with the task encoder and stored as safetensors.

Key `"{task}"` holds `(n_descriptions, dim)`; key `"{task}::definition"` holds `(1, dim)`. Training on a
machine without the embedder (the GPU machine) reads this file instead of loading the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.data import Task


def embed_tasks(tasks: Sequence[Task], encoder, max_descriptions: int = 64) -> dict[str, torch.Tensor]:
    out = {}
    for t in tqdm(tasks, desc="embedding task descriptions", mininterval=2.0):
        out[t.name] = encoder.encode(t.descriptions[:max_descriptions]).cpu()  # (n_desc, dim)
        out[f"{t.name}::definition"] = encoder.encode([t.definition]).cpu()  # (1, dim)
    return out


def save_embeddings(emb: dict[str, torch.Tensor], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in emb.items()}, str(path))


def load_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def task_embeddings(tasks: Sequence[Task], path: str | Path | None, encoder_name: str | None = None,
                    device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read `path` if it covers `tasks`, else compute with the encoder (and save to `path` when given)."""
    if path is not None and Path(path).is_file():
        emb = load_embeddings(path)
        missing = [t.name for t in tasks if t.name not in emb]
        if not missing:
            return emb
    from generator.encoder import TaskEncoder

    encoder = TaskEncoder.load(encoder_name, device) if encoder_name else TaskEncoder.load(device=device)
    emb = embed_tasks(tasks, encoder)
    if path is not None:
        save_embeddings(emb, path)
    return emb
