"""Super-NaturalInstructions tasks: loading, the deterministic train/test split, prompts and batches.

A task file holds a definition, paraphrased descriptions, two positive examples and instances (see
../shared/data/sni/README.md). Every training prompt follows generator.prompt: the task's instruction in
front of the input in the last user turn, and in about a third of the samples one or two of the task's
positive examples first as earlier chat turns (so adapters learn to work with in-context examples, not
against them). The answer is trained to end with the turn's stop token (`<|im_end|>`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from generator.scoring import Batcher, answer_loss  # noqa: F401  (re-exported: training code imports them here)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sni"


@dataclass
class Example:
    input: str
    outputs: list[str]  # every accepted answer; the first is the training target


@dataclass
class Task:
    name: str
    definition: str
    descriptions: list[str]
    positive_examples: list[Example]
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)


def split_instances(instances: Sequence[Example], test_fraction: float = 0.2) -> tuple[list[Example], list[Example]]:
    """Deterministic split: the last `test_fraction` (at least one) is the test portion."""
    n_test = max(1, round(len(instances) * test_fraction))
    return list(instances[:-n_test]), list(instances[-n_test:])


def load_task(path: Path, test_fraction: float = 0.2) -> Task:
    raw = json.loads(path.read_text())
    instances = [Example(i["input"], list(i["output"])) for i in raw["instances"] if i["output"]]
    train, test = split_instances(instances, test_fraction)
    return Task(
        name=raw["name"], definition=raw["definition"], descriptions=list(raw["descriptions"]) or [raw["definition"]],
        positive_examples=[Example(e["input"], [e["output"]]) for e in raw.get("positive_examples", [])],
        train=train, test=test,
    )


def load_split(split: str, data_dir: str | Path = DEFAULT_DATA, limit: int | None = None,
               test_fraction: float = 0.2) -> list[Task]:
    """Tasks of one manifest split ('train' or 'dev'), in manifest order."""
    root = Path(data_dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no SNI manifest at {manifest_path}; pass --data DIR (see ../shared/data/sni)")
    manifest = json.loads(manifest_path.read_text())
    if split not in manifest:
        raise ValueError(f"unknown split {split!r}; the manifest has {sorted(k for k in manifest if k != 'counts')}")
    names = manifest[split][:limit] if limit else manifest[split]
    return [load_task(root / "tasks" / f"{n}.json", test_fraction) for n in names]


EXAMPLE_RATE = 1 / 3  # share of training samples that get one or two positive examples as earlier turns


def sample_examples(task: Task, rng: random.Random, rate: float = EXAMPLE_RATE) -> list[tuple[str, str]]:
    """With probability `rate`, one or two of the task's positive examples as (input, answer) turns."""
    if not task.positive_examples or rng.random() >= rate:
        return []
    k = min(len(task.positive_examples), rng.choice((1, 2)))
    return [(e.input, e.outputs[0]) for e in rng.sample(task.positive_examples, k)]


def sample_pairs(tokenizer, tasks: Sequence[Task], per_task: int, rng: random.Random,
                 instructions: Sequence[str] | None = None,
                 example_rate: float = EXAMPLE_RATE) -> list[tuple[str, str]]:
    """`per_task` (prompt, answer) pairs from each task's train portion, task-major order.

    The instruction in front of each input is `instructions[i]` for `tasks[i]` (default: its definition).
    """
    from generator.prompt import task_prompt

    pairs = []
    for i, t in enumerate(tasks):
        instruction = instructions[i] if instructions is not None else t.definition
        for ex in rng.choices(t.train, k=per_task):
            prompt = task_prompt(tokenizer, instruction, ex.input, sample_examples(t, rng, example_rate))
            pairs.append((prompt, ex.outputs[0]))
    return pairs


