"""Relabelled copies of classification tasks: more training tasks, whose answer words only the instruction gives.

On an unseen task a generated adapter sometimes answers with the label words of the training tasks it resembles
and overrides the instruction and the examples (#10). A relabelled copy of a train task keeps its inputs and its
meaning but answers with other words ("Yes."/"No." -> "Correct."/"Incorrect."), and its definition says so. Two
tasks whose descriptions mean nearly the same thing but whose answers differ teach the hypernetwork to make
adapters that take the answer words from the prompt.

A task qualifies when it has 2 to 6 distinct answers, each answer is a word or short phrase (not a lone letter or
digit, which a definition uses for other things too) and its definition names every one. The new words are chosen
deterministically from the task's name and a seed, never from words the definition already uses. A quoted answer
in the definition is replaced; an answer it names unquoted is a word with a meaning there, so it stays and a closing
sentence says which new answer stands for it ('Answer "True" for sarcastic, "False" for non-sarcastic.'). Paraphrased
descriptions rarely name the answers, so a copy is described by its new definition (and by those paraphrases that
do name every answer, relabelled).
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from training.data import Example, Task

BINARY = [("True", "False"), ("Yes", "No"), ("Correct", "Incorrect"), ("Right", "Wrong"), ("Agree", "Disagree"),
          ("Valid", "Invalid"), ("Match", "Mismatch"), ("Same", "Different"), ("Good", "Bad"),
          ("Positive", "Negative"), ("Accept", "Reject"), ("Pass", "Fail")]
MANY = [("Red", "Blue", "Green", "Yellow", "Purple", "Orange"), ("Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta"),
        ("North", "South", "East", "West", "Up", "Down"), ("Apple", "Pear", "Plum", "Fig", "Lime", "Kiwi"),
        ("Type 1", "Type 2", "Type 3", "Type 4", "Type 5", "Type 6")]
SEPARATOR = "::relabel"


def _core(answer: str) -> tuple[str, str]:
    """An answer split into its words and its trailing punctuation: "Yes." -> ("Yes", ".")."""
    core = answer.strip().rstrip(".!")
    return core, answer.strip()[len(core):]


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def answer_words(task: Task) -> list[str] | None:
    """The task's distinct answers (first outputs, without trailing punctuation), when it qualifies; else None."""
    cores = sorted({_core(e.outputs[0])[0] for e in task.train + task.test + task.positive_examples if e.outputs})
    if not 2 <= len(cores) <= 6:
        return None
    for c in cores:
        if len(c) < 2 or not re.search(r"[A-Za-z]", c) or len(c.split()) > 3 or not _mentions(task.definition, c):
            return None
    return cores


def _choices(cores: list[str], definition: str) -> list[tuple[str, ...]]:
    """Candidate new answer sets for these answers: none shares a word with the old ones or the definition."""
    used = {c.lower() for c in cores}
    pool = BINARY if len(cores) == 2 else []
    pool = pool + [s[: len(cores)] for s in MANY]
    return [s for s in pool if not ({w.lower() for w in s} & used) and not any(_mentions(definition, w) for w in s)]


def _recase(new: str, seen: str) -> str:
    return new.lower() if seen.islower() else new.upper() if seen.isupper() and len(seen) > 1 else new


def _rewrite(text: str, mapping: dict[str, str]) -> str:
    """`text` with the new answers: a quoted mention of an old answer ('"Yes"', "'yes.'") is replaced in place (in
    one pass, so swaps never chain); an old answer the text still names unquoted is a word with a meaning there
    ("a sarcastic tweet"), so it stays and a sentence saying which new answer stands for it is appended."""
    pattern = "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True))
    lower = {k.lower(): v for k, v in mapping.items()}
    out = re.sub(rf"([\"'“‘`])({pattern})([.!]?[\"'”’`])",
                 lambda m: m.group(1) + _recase(lower[m.group(2).lower()], m.group(2)) + m.group(3), text,
                 flags=re.IGNORECASE)
    left = [k for k in mapping if _mentions(out, k)]
    if left:
        out = out.rstrip() + " Answer " + ", ".join(f'"{_recase(mapping[k], k)}" for {k}' for k in left) + "."
    return out


def _example(e: Example, mapping: dict[str, str]) -> Example | None:
    outputs = []
    for o in e.outputs:
        core, tail = _core(o)
        if core in mapping:
            outputs.append(_recase(mapping[core], core) + tail)  # "POS" -> "SAME", "spicy" -> "pass"
    return Example(e.input, outputs) if outputs else None


def relabel_task(task: Task, copy: int = 0, seed: int = 0) -> Task | None:
    """Copy number `copy` of `task` with new answer words, or None when the task does not qualify."""
    cores = answer_words(task)
    if cores is None:
        return None
    choices = _choices(cores, task.definition)
    if copy >= len(choices):
        return None
    rng = random.Random(f"{seed}:{task.name}")  # str seeds hash deterministically
    new = rng.sample(choices, len(choices))[copy]
    order = rng.sample(range(len(cores)), len(cores))  # which old answer gets which new word
    mapping = {c: new[j] for c, j in zip(cores, order, strict=True)}
    definition = _rewrite(task.definition, mapping)
    described = [_rewrite(d, mapping) for d in task.descriptions if all(_mentions(d, c) for c in cores)]

    def examples(items: list[Example]) -> list[Example]:
        return [x for x in (_example(e, mapping) for e in items) if x is not None]

    return replace(task, name=f"{task.name}{SEPARATOR}{copy}", definition=definition,
                   descriptions=described or [definition], positive_examples=examples(task.positive_examples),
                   train=examples(task.train), test=examples(task.test))


def relabel_tasks(tasks: list[Task], copies: int, seed: int = 0) -> list[Task]:
    """Up to `copies` relabelled copies of every qualifying task in `tasks` (task-major order)."""
    out = []
    for t in tasks:
        for k in range(copies):
            r = relabel_task(t, k, seed)
            if r is not None and r.train:
                out.append(r)
    return out


def main(argv: list[str] | None = None) -> None:
    """Add the relabelled copies' description embeddings to an embeddings file (for a machine without the
    encoder): `python -m training.relabel --embeddings runs/emb.safetensors --out runs/emb-relabel.safetensors`."""
    import argparse

    from safetensors.torch import load_file

    from training.data import DEFAULT_DATA, load_split
    from training.embeddings import embed_tasks, save_embeddings

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--embeddings", required=True, help="the train tasks' embeddings file (training.embeddings)")
    p.add_argument("--out", required=True, help="where to write it with the copies' embeddings added")
    p.add_argument("--copies", type=int, default=2, help="relabelled copies per qualifying task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--encoder", default=None, help="task encoder (default: the embedded all-MiniLM-L6-v2)")
    args = p.parse_args(argv)
    from generator.encoder import TaskEncoder

    copies = relabel_tasks(load_split("train", args.data), args.copies, args.seed)
    emb = load_file(args.embeddings)
    dtype = next(iter(emb.values())).dtype  # kept: the file travels to the GPU machine
    encoder = TaskEncoder.load(args.encoder) if args.encoder else TaskEncoder.load()
    emb |= {k: v.to(dtype) for k, v in embed_tasks(copies, encoder).items()}
    save_embeddings(emb, args.out)
    print(f"{len(copies)} relabelled copies of {len({t.name.split(SEPARATOR)[0] for t in copies})} tasks -> {args.out}")


if __name__ == "__main__":
    main()
