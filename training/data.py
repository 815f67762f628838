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

import torch

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


class Batcher:
    """Tokenises (prompt, answer) pairs into right-padded batches with loss only on the answer tokens."""

    def __init__(self, tokenizer, max_prompt_tokens: int = 256, max_answer_tokens: int = 64) -> None:
        from generator.inference import stop_ids

        self.tok = tokenizer
        self.max_prompt, self.max_answer = max_prompt_tokens, max_answer_tokens
        self.stop = stop_ids(tokenizer)[-1]  # <|im_end|> for chat models
        self._cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        key = (prompt, answer)
        if key not in self._cache:
            p = self.tok(prompt, add_special_tokens=False)["input_ids"][-self.max_prompt:]
            a = self.tok(answer, add_special_tokens=False)["input_ids"][: self.max_answer - 1] + [self.stop]
            self._cache[key] = (p, a)
        return self._cache[key]

    def batch(self, pairs: Sequence[tuple[str, str]], device: torch.device | str) -> dict[str, torch.Tensor]:
        enc = [self.encode(p, a) for p, a in pairs]
        width = max(len(p) + len(a) for p, a in enc)
        pad = self.tok.pad_token_id
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        labels = torch.full((len(enc), width), -100, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, (p, a) in enumerate(enc):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p): len(seq)] = torch.tensor(a)
            mask[i, : len(seq)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


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


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over sequences of each sequence's mean answer-token cross-entropy.

    The LM head runs only where a next token is scored (the answer tokens), not over the whole
    `(batch, seq, vocab)` grid: with a 49k vocabulary that is most of a step's memory.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted from position t
    mask = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()  # (n_answer_tokens, vocab)
    ce = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="none")
    seq = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]  # owner of each token
    per_seq = torch.zeros(labels.shape[0], device=ce.device).index_add_(0, seq, ce)
    return (per_seq / mask.sum(1).clamp(min=1)).mean()
