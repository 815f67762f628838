"""Reading the trained LoRA library (`hyperlora train lora-library`) as data for the CVAE / SG generators.

One folder per task under the library root:
  `adapter_config.json`, `adapter_model.safetensors`  the final LoRA (PEFT)
  `meta.json`                                         {"task", "descriptions": [...], "loss", "steps", ...}
  `snapshots.safetensors`                             the run's last K checkpoints: "{module}.A" `(K, L, r, d_in)`,
                                                      "{module}.B" `(K, L, d_out, r)` per target module
A folder without meta.json (a task still being written) is skipped. Without snapshots, the final adapter is
the task's only sample. Description embeddings live in a separate safetensors file in the format of
training/embeddings.py (key "{task}": `(n_descriptions, dim)`), plus our "{task}::examples": `(1, dim)`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from generator.lora import LoraAdapter
from generator.peft_io import WEIGHTS_NAME, load_peft, save_peft
from generator.spec import ModelSpec

logger = logging.getLogger(__name__)
META, SNAPSHOTS = "meta.json", "snapshots.safetensors"
EXAMPLES_KEY = "{task}::examples"


@dataclass
class TaskAdapters:
    """One library task: its descriptions, final adapter and the last checkpoints of its training run."""

    task: str
    descriptions: list[str]
    final: LoraAdapter
    snap_a: dict[str, torch.Tensor]  # module -> (K, L, r, d_in)
    snap_b: dict[str, torch.Tensor]  # module -> (K, L, d_out, r)
    meta: dict

    @property
    def n_snapshots(self) -> int:
        return next(iter(self.snap_a.values())).shape[0]

    def snapshots(self) -> list[LoraAdapter]:
        f = self.final
        return [LoraAdapter(f.base_model, f.rank, f.alpha, {m: t[k] for m, t in self.snap_a.items()},
                            {m: t[k] for m, t in self.snap_b.items()}) for k in range(self.n_snapshots)]


def _read_snapshots(folder: Path, final: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    path = folder / SNAPSHOTS
    if not path.is_file():
        return {m: t[None] for m, t in final.a.items()}, {m: t[None] for m, t in final.b.items()}  # K = 1
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{folder.name}: {SNAPSHOTS} is not a readable safetensors file: {e}") from e
    a, b = {}, {}
    for m in final.target_modules:
        for part, want, out in (("A", final.a[m].shape, a), ("B", final.b[m].shape, b)):
            t = state.get(f"{m}.{part}")
            if t is None or t.dim() != 4 or tuple(t.shape[1:]) != tuple(want):
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"{folder.name}: {SNAPSHOTS} key {m}.{part} is {got}, expected (K, *{tuple(want)})")
            out[m] = t.float()
    if len({t.shape[0] for t in (*a.values(), *b.values())}) != 1:
        raise ValueError(f"{folder.name}: {SNAPSHOTS} holds different K for different modules")
    return a, b


def load_task(folder: str | Path, spec: ModelSpec | None = None) -> TaskAdapters:
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    final = load_peft(folder, spec)
    a, b = _read_snapshots(folder, final)
    descriptions = [d for d in meta.get("descriptions", []) if isinstance(d, str) and d.strip()]
    if not descriptions:
        raise ValueError(f"{folder.name}: {META} has no descriptions")
    return TaskAdapters(meta.get("task", folder.name), descriptions, final, a, b, meta)


def task_dirs(root: str | Path) -> list[Path]:
    """The finished task folders of a library, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LoRA library {root} does not exist (build it with `hyperlora train lora-library`)")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / META).is_file())


def load_lora_library(root: str | Path, spec: ModelSpec | None = None,
                      tasks: Sequence[str] | None = None) -> list[TaskAdapters]:
    """Every finished task of the library (or only `tasks`); all must share rank, alpha and target modules."""
    dirs = task_dirs(root)
    if tasks is not None:
        missing = sorted(set(tasks) - {d.name for d in dirs})
        if missing:
            raise ValueError(f"task(s) {missing[:5]} are not in the library {root}")
        dirs = [d for d in dirs if d.name in set(tasks)]
    if not dirs:
        raise ValueError(f"LoRA library {root} holds no finished task (no <task>/{META})")
    lib = [load_task(d, spec) for d in dirs]
    first = lib[0].final
    for t in lib[1:]:
        f = t.final
        if (f.rank, f.alpha, f.target_modules) != (first.rank, first.alpha, first.target_modules):
            raise ValueError(f"{t.task} is rank {f.rank}, alpha {f.alpha} on {f.target_modules} but {lib[0].task} "
                             f"is rank {first.rank}, alpha {first.alpha} on {first.target_modules}")
        if {m: x.shape for m, x in f.a.items()} != {m: x.shape for m, x in first.a.items()}:
            raise ValueError(f"{t.task} and {lib[0].task} have adapters of different shapes")
    logger.info("loaded %d library task(s) with %d snapshot(s) in all from %s", len(lib),
                sum(t.n_snapshots for t in lib), root)
    return lib


def library_nbytes(root: str | Path) -> dict[str, int]:
    """On-disk bytes of the library's final adapters and of its snapshot files."""
    dirs = task_dirs(root)
    final = sum((d / WEIGHTS_NAME).stat().st_size for d in dirs if (d / WEIGHTS_NAME).is_file())
    snaps = sum((d / SNAPSHOTS).stat().st_size for d in dirs if (d / SNAPSHOTS).is_file())
    return {"tasks": len(dirs), "final_bytes": final, "snapshot_bytes": snaps}


def write_library_task(root: str | Path, task: str, descriptions: Sequence[str], snapshots: Sequence[LoraAdapter],
                       loss: float = 0.0, steps: int = 0) -> Path:
    """Write one task folder in the library format (the last snapshot is the final adapter); atomic."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{task}.tmp-"))
    try:
        save_peft(snapshots[-1], tmp / "peft")
        for f in (tmp / "peft").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "peft").rmdir()
        mods = snapshots[-1].target_modules
        stacked = {f"{m}.A": torch.stack([s.a[m] for s in snapshots]).contiguous() for m in mods}  # (K, L, r, d_in)
        stacked |= {f"{m}.B": torch.stack([s.b[m] for s in snapshots]).contiguous() for m in mods}  # (K, L, d_out, r)
        save_file(stacked, str(tmp / SNAPSHOTS))
        meta = {"task": task, "descriptions": list(descriptions), "loss": loss, "steps": steps}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        final = root / task
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / task


def format_example(inp: str, out: str) -> str:
    """One demonstration of a task as the text whose embedding joins the in-context condition."""
    return f"Input: {inp.strip()}\nOutput: {out.strip()}"


def sni_examples(data_dir: str | Path, tasks: Sequence[str], n: int = 2) -> dict[str, list[str]]:
    """The first `n` positive examples of each SNI task (`<data_dir>/tasks/<task>.json`) that has a file."""
    out = {}
    for task in tasks:
        path = Path(data_dir) / "tasks" / f"{task}.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            out[task] = [format_example(e["input"], e["output"]) for e in raw.get("positive_examples", [])[:n]]
    return out


def load_embedding_file(path: str | Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def missing_embeddings(tasks: Sequence[str], emb: dict[str, torch.Tensor],
                       examples: dict[str, list[str]] | None = None) -> tuple[list[str], list[str]]:
    """Tasks whose description embeddings, and tasks whose example embeddings, `emb` lacks."""
    desc = [t for t in tasks if t not in emb]
    ex = [t for t, texts in (examples or {}).items() if texts and EXAMPLES_KEY.format(task=t) not in emb]
    return desc, ex


def library_embeddings(descriptions: dict[str, list[str]], path: str | Path | None,
                       load_encoder: Callable[[], object] | None = None,
                       examples: dict[str, list[str]] | None = None,
                       max_descriptions: int = 64) -> dict[str, torch.Tensor]:
    """Description (and example) embeddings of tasks, read from `path`, the missing ones computed and saved.

    Keys: "{task}" `(n, dim)` unit-norm description embeddings; "{task}::examples" `(1, dim)` the mean of the
    task's example embeddings (only for tasks in `examples`). `load_encoder` is called only when some are missing.
    """
    emb = load_embedding_file(path) if path is not None and Path(path).is_file() else {}
    need, need_ex = missing_embeddings(list(descriptions), emb, examples)
    if not need and not need_ex:
        return emb
    if load_encoder is None:
        names = need + need_ex
        raise ValueError(f"embeddings of {len(names)} task(s) (e.g. {names[0]}) are missing from {path} and no "
                         f"encoder is available to compute them (compute them on a machine with the embedder)")
    encoder = load_encoder()
    for t in need:
        emb[t] = encoder.encode(descriptions[t][:max_descriptions]).cpu()  # (n_desc, dim)
    for t in need_ex:
        emb[EXAMPLES_KEY.format(task=t)] = encoder.encode(examples[t], what="example").mean(0, keepdim=True).cpu()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in emb.items()}, str(path))
        logger.info("wrote %d description and %d example embedding(s) to %s", len(need), len(need_ex), path)
    return emb
