"""`eval quality`, generation half: each method's greedy answers on held-out instances -> predictions.json.

Every prompt follows generator.prompt (the task's definition as the instruction in front of the input).
Dev tasks (never trained on) compare the base model with the input alone, with the instruction and with
the instruction and 2 examples (2-shot ICL), the multi-task LoRA and generated adapters (from a
description and from the definition) under the same prompts; a sample of train tasks compares oracle
library LoRAs with the generators. Scoring (training/report.py) runs where rouge-score is installed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from generator.apply import AdapterBank
from generator.inference import generate_text
from generator.lora import LoraAdapter
from generator.peft_io import load_peft
from generator.prompt import task_prompt
from training.data import DEFAULT_DATA, Task, load_split

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What `eval quality` generates."""

    max_new_tokens: int = 48  # answers are short (median 6 characters)
    batch_size: int = 64  # prompts per generate call
    max_per_task: int | None = None  # cap test instances per task (smoke runs; the GPU job caps at 40)
    dev_test_fraction: float = 1.0  # no generator trains on a dev task: all its instances are test instances
    train_sample: int = 16  # train tasks for oracle-vs-reconstruction
    hypernets: dict[str, str] = field(default_factory=dict)  # row name -> T2L checkpoint dir, e.g. {"t2l-sft": ...}
    generators: dict[str, str] = field(default_factory=dict)  # row name -> "kind:checkpoint" of other generators
    multitask: str | None = None  # multi-task LoRA PEFT dir
    loras: dict[str, str] = field(default_factory=dict)  # row name -> PEFT dir: more fixed LoRAs, like multitask
    library: str | None = None  # LoRA library dir (oracle rows)
    baselines: bool = True  # the rows without adapter, the multi-task LoRA and the oracles (off: only the
    # generators' and `loras`' rows, to merge into an earlier predictions file)
    example_strength: bool = True  # a T2L row whose strength beside 2 examples is chosen from those examples
    methods: frozenset[str] | None = None  # only these rows (exact method names); None: every row


@dataclass
class Row:
    """One method on one task set: prompts plus, per prompt, an adapter (or None)."""

    method: str
    split: str  # "dev" or "train"
    task: str
    inputs: list[str]
    references: list[list[str]]
    prompts: list[str]
    adapter: LoraAdapter | None
    prompt_kind: str = "input"  # which PROMPTS entry built the prompts: the same kind without adapter is the
    # row's reference (harm is measured against it)


def input_prompt(tok, task: Task, x: str) -> str:
    return task_prompt(tok, None, x)


def definition_prompt(tok, task: Task, x: str) -> str:
    return task_prompt(tok, task.definition, x)


def icl_prompt(tok, task: Task, x: str) -> str:
    return task_prompt(tok, task.definition, x, [(s.input, s.outputs[0]) for s in task.positive_examples[:2]])


# prompt kind -> (builder, the method name of that prompt without an adapter, suffix of adapter rows using it)
PROMPTS = {"input": (input_prompt, "base", ""),
           "instruction": (definition_prompt, "base + instruction", " + instruction"),
           "icl": (icl_prompt, "2-shot ICL", " + instruction + 2 examples")}


def make_row(method, split, task, tok, kind, adapter, max_per_task) -> Row:
    test = task.test[:max_per_task] if max_per_task else task.test
    build = PROMPTS[kind][0]
    return Row(method, split, task.name, [e.input for e in test], [e.outputs for e in test],
               [build(tok, task, e.input) for e in test], adapter, kind)


def run_rows(rows: Sequence[Row], model, tok, injector, spec, ecfg: EvalConfig, device) -> list[dict]:
    """Generate every row's answers, batching across rows; each prompt uses its row's adapter."""
    items = sorted(((r, i) for r in rows for i in range(len(r.prompts))), key=lambda x: len(x[0].prompts[x[1]]))
    # (by prompt length: a batch pads to its longest prompt)
    adapters = [r.adapter for r in rows if r.adapter is not None]
    slot = {id(a): k for k, a in enumerate(adapters)}
    bank = AdapterBank.from_adapters(adapters, spec, device, next(model.parameters()).dtype) if adapters else None
    preds: dict[tuple[int, int], str] = {}
    for start in tqdm(range(0, len(items), ecfg.batch_size), desc="generating", mininterval=2.0):
        chunk = items[start: start + ecfg.batch_size]
        groups: dict[bool, list] = {True: [], False: []}
        for r, i in chunk:
            groups[r.adapter is not None].append((r, i))
        for with_adapter, group in groups.items():
            if not group:
                continue
            lora = None
            if with_adapter:
                index = torch.tensor([slot[id(r.adapter)] for r, _ in group])
                lora = bank.gather(index)
            outs = generate_text(model, tok, [r.prompts[i] for r, i in group], injector, lora, ecfg.max_new_tokens)
            for (r, i), o in zip(group, outs, strict=False):
                preds[(id(r), i)] = o
    return [{"method": r.method, "split": r.split, "task": r.task, "input": r.inputs[i], "prompt": r.prompt_kind,
             "adapter": r.adapter is not None, "prediction": preds[(id(r), i)], "references": r.references[i]}
            for r in rows for i in range(len(r.prompts))]


def generated_adapters(kind_ckpt: str, spec, emb: torch.Tensor, device) -> list[LoraAdapter]:
    """Adapters from a generator checkpoint for the task embeddings `emb` `(N, dim)`."""
    from generator.generate import GENERATORS

    kind, _, ckpt = kind_ckpt.partition(":")
    gen = GENERATORS[kind].from_checkpoint(ckpt, None, spec, device)
    with torch.no_grad():
        a, b = gen.factors(emb.to(device))
    return [LoraAdapter(spec.name, gen.rank, gen.alpha, {m: t[i].float().cpu() for m, t in a.items()},
                        {m: t[i].float().cpu() for m, t in b.items()}) for i in range(emb.shape[0])]


def recorded_strengths(kind_ckpt: str) -> dict[str, float]:
    """The strengths the checkpoint recorded (training/strength.py), by the prompt kind they are for: `strength`
    without examples ("instruction"), `strength_with_examples` beside them ("icl"); those it records, but 1."""
    meta = Path(kind_ckpt.partition(":")[2]) / "hypernet.json"
    extra = json.loads(meta.read_text()).get("extra", {}) if meta.is_file() else {}
    found = {kind: extra.get(key) for kind, key in (("instruction", "strength"), ("icl", "strength_with_examples"))}
    return {kind: float(v) for kind, v in found.items() if v is not None and float(v) != 1.0}


def example_strength_rows(name: str, ads: list[LoraAdapter], dev: list[Task], model, tok, injector, spec, mx,
                          device) -> tuple[list[Row], dict]:
    """`name x[examples] + instruction + 2 examples`: each task's adapter at the strength that best predicts the
    prompt's own 2 examples from each other (generator.scoring), as a server does with a request's examples."""
    from generator.scoring import strength_from_examples

    rows, chosen = [], {}
    for t, a in zip(dev, ads, strict=True):
        examples = [(e.input, e.outputs[0]) for e in t.positive_examples[:2]]
        if len(examples) < 2:
            continue
        s, loss = strength_from_examples(model, tok, injector, spec, a, t.definition, examples, device=device)
        chosen[t.name] = {"strength": s, "loss": loss}
        rows.append(make_row(f"{name} x[examples]" + PROMPTS["icl"][2], "dev", t, tok, "icl",
                             replace(a, alpha=a.alpha * s), mx))
    return rows, chosen


def build_rows(ecfg: EvalConfig, tok, spec, emb: dict[str, torch.Tensor], dev: list[Task], train: list[Task],
               device, model=None, injector=None, skip: frozenset[str] = frozenset()) -> tuple[list[Row], dict]:
    """Dev: every baseline prompt without adapter, the multi-task LoRA and each generator with the instruction
    (and with 2 examples); train sample: oracle library LoRAs against the generators. Also returns, per
    example-strength row, each task's chosen strength (needs `model` and `injector`). Methods in `skip` (those an
    earlier predictions file holds) are left out."""
    rows, notes = [], {}
    mx = ecfg.max_per_task
    if ecfg.baselines:
        for t in dev:
            rows += [make_row(PROMPTS[k][1], "dev", t, tok, k, None, mx) for k in PROMPTS]
    fixed = ({"multi-task LoRA": ecfg.multitask} if ecfg.multitask and ecfg.baselines else {}) | dict(ecfg.loras)
    for name, path in fixed.items():
        lora = load_peft(path, spec)
        rows += [make_row(name + PROMPTS[k][2], "dev", t, tok, k, lora, mx)
                 for t in dev for k in ("instruction", "icl")]
    sources = {name: f"t2l:{path}" for name, path in ecfg.hypernets.items()} | dict(ecfg.generators)
    desc = torch.stack([emb[t.name][0] for t in dev])  # (n_dev, dim): each dev task's first description
    defn = torch.stack([emb[f"{t.name}::definition"][0] for t in dev])
    for name, source in sources.items():
        strengths = recorded_strengths(source)
        for suffix, e, kinds in (("", desc, ("instruction", "icl")), (" [definition]", defn, ("instruction",))):
            ads = generated_adapters(source, spec, e, device)
            rows += [make_row(name + suffix + PROMPTS[k][2], "dev", t, tok, k, a, mx)
                     for t, a in zip(dev, ads, strict=True) for k in kinds]
            for k, s in strengths.items() if not suffix else ():  # the shipped strengths, without and with examples
                rows += [make_row(f"{name} x{s:g}" + PROMPTS[k][2], "dev", t, tok, k, replace(a, alpha=a.alpha * s),
                                  mx) for t, a in zip(dev, ads, strict=True)]
            chosen_by_examples = f"{name} x[examples]"
            if (not suffix and ecfg.example_strength and model is not None and source.startswith("t2l:")
                    and chosen_by_examples + PROMPTS["icl"][2] not in skip):
                more, notes[chosen_by_examples] = example_strength_rows(name, ads, dev, model, tok, injector, spec,
                                                                        mx, device)
                rows += more
    if ecfg.library and train and ecfg.baselines:
        lib = Path(ecfg.library)
        sample = [t for t in train if (lib / t.name / "adapter_model.safetensors").is_file()][: ecfg.train_sample]
        if not sample:
            logger.warning("no trained library LoRA in %s: the train-task rows are left out", lib)
            return [r for r in rows if r.method not in skip], notes
        rows += [make_row("oracle LoRA + instruction", "train", t, tok, "instruction", load_peft(lib / t.name, spec),
                          mx) for t in sample]
        rows += [make_row("base + instruction", "train", t, tok, "instruction", None, mx) for t in sample]
        e = torch.stack([emb[t.name][0] for t in sample])
        for name, source in sources.items():
            ads = generated_adapters(source, spec, e, device)
            rows += [make_row(name + " + instruction", "train", t, tok, "instruction", a, mx)
                     for t, a in zip(sample, ads, strict=True)]
    return [r for r in rows if r.method not in skip], notes


def predict(cfg, ecfg: EvalConfig, out: str | Path, embeddings: str | None = None, command: str = "",
            merge_into: str | Path | None = None) -> Path:
    """Generate all rows' answers; write predictions.json (scored by training.report). With `merge_into` (an
    earlier predictions file, .json or .json.gz), its records are kept and only the methods it lacks are added."""
    from training.embeddings import task_embeddings
    from training.runtime import load_frozen

    data = cfg.data or DEFAULT_DATA
    dev = load_split("dev", data, cfg.limit_tasks, test_fraction=ecfg.dev_test_fraction)
    train = load_split("train", data, cfg.limit_tasks)
    emb = task_embeddings(dev + train, embeddings)
    model, tok, spec, injector = load_frozen(cfg, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"))
    t0 = time.perf_counter()
    old = None
    if merge_into:  # only the methods the earlier file lacks are generated
        from training.report import load_predictions

        old = load_predictions(merge_into)
    have = frozenset(r["method"] for r in old["records"]) if old else frozenset()
    rows, notes = build_rows(ecfg, tok, spec, emb, dev, train, cfg.device, model, injector, skip=have)
    if ecfg.methods is not None:
        missing = ecfg.methods - {r.method for r in rows} - have
        if missing:
            raise SystemExit(f"no such rows to predict: {sorted(missing)}; rows: {sorted({r.method for r in rows})}")
        rows = [r for r in rows if r.method in ecfg.methods]
    records = run_rows(rows, model, tok, injector, spec, ecfg, cfg.device)
    doc = {"command": command, "base_model": spec.name, "device": str(cfg.device), "dtype": cfg.dtype,
           "seconds": time.perf_counter() - t0, "max_new_tokens": ecfg.max_new_tokens, "example_strengths": notes}
    if old is not None:
        records = old["records"] + records
        doc |= {"command": f"{old.get('command', '')} ; then {command}",
                "example_strengths": old.get("example_strengths", {}) | notes}
    doc["records"] = records
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    logger.info("wrote %d predictions to %s", len(records), path)
    return path
