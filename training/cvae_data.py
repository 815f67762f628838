"""The LoRA library as tensors for CVAE / SG training: every snapshot's rows, who owns it, and the conditions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from generator.cvae.model import RowLayout
from generator.library_data import EXAMPLES_KEY, TaskAdapters, library_embeddings, load_lora_library, sni_examples
from generator.spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class LibraryTensors:
    """Training data on one device. S = snapshots over all tasks, E = tasks, D = embedding width."""

    tasks: list[str]  # E task names
    rows: list[torch.Tensor]  # per kind (S, L, r, d), parameter units
    owner: torch.Tensor  # (S,) long: which task each snapshot belongs to
    desc: torch.Tensor  # (E, n_max, D) description embeddings, zero-padded
    n_desc: torch.Tensor  # (E,) long: how many of each task's rows are real
    desc_mean: torch.Tensor  # (E, D) unit-norm mean description embedding (the expert key)
    examples: torch.Tensor  # (E, D) mean example embedding, zero rows where a task has none
    spec: ModelSpec
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def n_samples(self) -> int:
        return self.owner.shape[0]

    @property
    def has_examples(self) -> bool:
        return bool((self.examples.abs().sum(-1) > 0).any())

    def sample_descriptions(self, owner: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random description embedding of each sample's task: `(B,)` -> `(B, D)`."""
        pick = (torch.rand(owner.shape[0], generator=gen) * self.n_desc[owner].cpu()).long()
        return self.desc[owner, pick.to(owner.device)]


def library_spec(task: TaskAdapters) -> ModelSpec:
    """The shapes an adapter of the library implies (enough for the CVAE: only target modules matter)."""
    f = task.final
    shapes = {m: (f.a[m].shape[2], f.b[m].shape[1]) for m in f.target_modules}
    return ModelSpec(name=f.base_model, n_layers=f.n_layers, shapes=shapes)


def _stack_embeddings(tasks: list[str], emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n_max = max(emb[t].shape[0] for t in tasks)
    dim = emb[tasks[0]].shape[1]
    desc = torch.zeros(len(tasks), n_max, dim)
    for i, t in enumerate(tasks):
        desc[i, : emb[t].shape[0]] = emb[t]
    return desc, torch.tensor([emb[t].shape[0] for t in tasks])


def load_library_tensors(library: str | Path, embeddings: str | Path | None = None, embedder: str | None = None,
                         data: str | Path | None = None, n_examples: int = 2,
                         device: torch.device | str = "cpu") -> LibraryTensors:
    """Read the library and its condition embeddings (from `embeddings`, computing missing ones with `embedder`)."""
    lib = load_lora_library(library)
    tasks = [t.task for t in lib]
    examples = sni_examples(data, tasks, n_examples) if data is not None else None

    def load_encoder():
        from generator.encoder import TaskEncoder

        return TaskEncoder.load(embedder) if embedder else TaskEncoder.load()

    emb = library_embeddings({t.task: t.descriptions for t in lib}, embeddings, load_encoder, examples)
    desc, n_desc = _stack_embeddings(tasks, emb)
    ex = torch.zeros(len(tasks), desc.shape[-1])
    for i, t in enumerate(tasks):
        if EXAMPLES_KEY.format(task=t) in emb:
            ex[i] = emb[EXAMPLES_KEY.format(task=t)][0]
    desc_mean = torch.nn.functional.normalize(desc.sum(1) / n_desc[:, None], dim=-1)  # (E, D)
    spec = library_spec(lib[0])
    first = lib[0].final
    per_kind: list[list[torch.Tensor]] = []
    owner = []
    for i, t in enumerate(lib):
        per_kind.append(_task_rows(t, first.target_modules))
        owner += [i] * t.n_snapshots
    rows = [torch.cat([k[j] for k in per_kind]).to(device) for j in range(len(per_kind[0]))]  # (S, L, r, d)
    logger.info("library: %d tasks, %d snapshots, %d params each", len(tasks), len(owner),
                sum(r[0].numel() for r in rows))
    return LibraryTensors(tasks, rows, torch.tensor(owner, device=device), desc.to(device), n_desc.to(device),
                          desc_mean.to(device), ex.to(device), spec, first.rank, first.alpha, first.target_modules)


def _task_rows(task: TaskAdapters, targets: tuple[str, ...]) -> list[torch.Tensor]:
    """Rows of every snapshot of one task, in RowLayout's kind order: `[(K, L, r, d)]`."""
    out = []
    for m in targets:
        out += [task.snap_a[m], task.snap_b[m].transpose(-1, -2)]
    return out


def check_layout(layout: RowLayout, data: LibraryTensors) -> None:
    for (m, p, d), r in zip(layout.kinds, data.rows, strict=True):
        if r.shape[-1] != d:
            raise ValueError(f"library {m}.{p} rows are {r.shape[-1]} wide but the CVAE expects {d}")
