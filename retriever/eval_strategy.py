"""`hyperlora eval strategy`: ROUGE-L of the generate / retrieve / auto strategies (retriever/strategy.py) on
(a) train tasks described by held-out paraphrases (descriptions 150-199, never used in calibration or keys),
(b) dev tasks described by their definitions, and (c) the same dev tasks with their own adapter added to the library.

The library is built in a temporary directory from `--library` (PEFT folders named by train task, as
`train lora-library` writes them), keyed by each task's first 32 descriptions and 20 first inputs, as the default
library is; `--dev-library` holds the dev tasks' adapters for (c). Without `--library`, the generator makes a
stand-in library from each task's first description (say so when reporting). Prompts follow the one prompt
convention (generator.prompt.task_prompt: an instruction + the input), under two conventions scored in the same run
(`CONVENTIONS`): "served", the instruction the served adapter carries (`DescriptionStrategy.instruction`: a library
adapter's own on the retrieve path, the description for a generated adapter or a mixture), which the issue's
targets are judged on; and "description", the row's description in front for every strategy (the earlier tables).
Generation is greedy and stops at <|im_end|>. Answers are cached per (adapter, prompt), so strategies and
conventions that agree share them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.models import DEFAULT_BASE_MODEL
from generator.peft_io import CONFIG_NAME
from retriever.calibrate import CALIBRATION_SLICE, EVALUATION_SLICE
from retriever.evaluate import heldout, rouge_l, spread, write_report
from retriever.library import AdapterLibrary
from retriever.strategy import STRATEGY_NAMES, DescriptionStrategy, StrategyConfig
from retriever.tasks import load_sni

logger = logging.getLogger(__name__)
SETTINGS = {"a": "train tasks, held-out paraphrases", "b": "dev tasks, definitions",
            "c": "dev tasks, definitions, own adapter in the library",
            "lacking": "train tasks the library lacks, held-out paraphrases"}
PARAPHRASES = {"evaluation": EVALUATION_SLICE, "calibration": CALIBRATION_SLICE}
KEY_DESCRIPTIONS, KEY_SAMPLES = StrategyConfig().key_descriptions, 20  # as the default library stores
CONVENTIONS = {"served": "the instruction the served adapter carries",
               "description": "the description in front for every strategy"}


@dataclass
class EvalStrategyConfig:
    """What `eval strategy` runs; the defaults finish on a CPU in minutes."""

    sni_dir: str = "../shared/data/sni"  # SNI data directory (evaluation data; the product never reads it)
    library: str | None = None  # PEFT folders named by train task; None: generated stand-ins (say so)
    dev_library: str | None = None  # PEFT folders named by dev task, for setting (c); None: (c) is skipped
    tasks: int = 8  # tasks per setting, spread over the sorted names (>= 1)
    inputs: int = 4  # test-portion inputs per task (>= 1)
    max_new_tokens: int = 32  # greedy tokens per answer (>= 1)
    batch_size: int = 16  # prompts per generate call (>= 1)
    base_model: str = DEFAULT_BASE_MODEL
    device: str = "cpu"
    # evaluation: settings (a), (b), (c) on descriptions 150-199; calibration: train tasks only, on descriptions
    # 100-149 (the calibration's), (a) and train tasks the library lacks, for the outcome qualities the match fit uses
    paraphrases: str = "evaluation"

    def __post_init__(self) -> None:
        if self.paraphrases not in PARAPHRASES:
            raise ValueError(f"paraphrases={self.paraphrases!r} (allowed: {list(PARAPHRASES)})")
        for name in ("tasks", "inputs", "max_new_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} (must be an integer >= 1)")
        for name in ("library", "dev_library"):
            d = getattr(self, name)
            if d is not None and not Path(d).is_dir():
                raise ValueError(f"{name}={d!r} is not a directory of PEFT adapter folders")


@dataclass
class Row:
    task: str
    description: str
    input: str
    references: list[str]


@dataclass
class Planned:
    """One row's adapter under one strategy, and its prompt under each convention."""

    key: str  # names the adapter (answers are cached per key and prompt)
    adapter: object  # a library id (path retrieve) or a LoraAdapter (generated or mixed)
    instruction: str  # what the served adapter puts in front of the input
    source: str  # where that came from: "library" (a record's own), "adapter" (the built adapter's), "fallback"
    prompts: dict[str, str]  # convention -> prompt


def peft_dirs(root: str | Path | None) -> dict[str, Path]:
    """task -> PEFT folder under `root` (folders holding adapter_config.json, named by task)."""
    if root is None:
        return {}
    return {d.name: d for d in sorted(Path(root).iterdir()) if d.is_dir() and (d / CONFIG_NAME).is_file()}


def _add(library: AdapterLibrary, sni: dict[str, dict], name: str, path: Path | None, generated=None) -> str:
    t = sni[name]
    descriptions = t["descriptions"][:KEY_DESCRIPTIONS] or [t["definition"]]
    samples = [i["input"][:400] for i in t["instances"][:KEY_SAMPLES]]
    if path is not None:
        return library.add_peft_dir(path, name, descriptions, "trained", samples).id
    return library.add(generated, name, descriptions, "generated", samples).id


def build_library(root: Path, gen, train: dict[str, dict], ecfg: EvalStrategyConfig) -> tuple[AdapterLibrary, str]:
    """The (a)/(b) library: the trained train-task adapters, or generated stand-ins for `tasks` train tasks."""
    library = AdapterLibrary(root, gen.spec)
    trained = {n: p for n, p in peft_dirs(ecfg.library).items() if n in train}
    if trained:
        for name, path in trained.items():
            _add(library, train, name, path)
        return library, "trained"
    names = spread(sorted(train), ecfg.tasks)
    adapters = gen.generate([train[n]["descriptions"][0] for n in names])
    for name, adapter in zip(names, adapters, strict=True):
        _add(library, train, name, None, adapter)
    return library, "generated from each task's first description (no --library given)"


def setting_rows(sni: dict[str, dict], names: Sequence[str], n_inputs: int, paraphrase: bool,
                 held_out: slice = EVALUATION_SLICE) -> list[Row]:
    """Each task's last test-portion inputs; the description is a held-out paraphrase from `held_out` (one per
    input) or the definition."""
    rows = []
    for j, (task, x, refs) in enumerate(heldout(sni, names, n_inputs)):
        held = sni[task]["descriptions"][held_out]
        desc = held[j % len(held)] if paraphrase and held else sni[task]["definition"]
        rows.append(Row(task, desc, x, refs))
    return rows


class Runner:
    """The base model with an injector; answers rows under given adapters, batching and caching answers."""

    def __init__(self, gen, strategy: DescriptionStrategy, ecfg: EvalStrategyConfig) -> None:
        from rouge_score import rouge_scorer

        from generator.apply import LoraInjector
        from generator.models import load_base_model

        self.gen, self.strategy, self.ecfg = gen, strategy, ecfg
        self.model, self.tok = load_base_model(ecfg.base_model, ecfg.device)
        self.injector = LoraInjector(self.model, gen.spec, sorted(gen.spec.shapes))
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        self.answers: dict[tuple[str, str], str] = {}  # (adapter key, prompt) -> answer

    def run(self, rows: Sequence[Row], strategies: Sequence[str], own_in_library: bool) -> dict:
        plans, paths, top1 = self.plan(rows, strategies)
        every = [p for s in strategies for p in plans[s]]
        todo = sorted({(p.key, q) for p in every for q in p.prompts.values()} - set(self.answers))
        adapters = {p.key: p.adapter for p in every}
        bar = tqdm(total=len(todo), desc="answering", mininterval=2.0)
        for start in range(0, len(todo), self.ecfg.batch_size):
            chunk = todo[start: start + self.ecfg.batch_size]
            outs = self._answer([q for _, q in chunk], [adapters[k] for k, _ in chunk])
            self.answers.update(zip(chunk, outs, strict=True))
            bar.update(len(chunk))
        bar.close()
        per_row = {(s, c): [rouge_l(self.answers[(p.key, p.prompts[c])], r.references, self.scorer)
                            for p, r in zip(plans[s], rows, strict=True)] for s in strategies for c in CONVENTIONS}
        out = {"outcomes": outcomes(per_row[("retrieve", "served")], per_row[("generate", "served")], top1)}
        tasks = [r.task for r in rows]
        for s in strategies:
            score = {c: round(_task_mean(per_row[(s, c)], tasks), 2) for c in CONVENTIONS}
            sources = {k: sum(p.source == k for p in plans[s]) for k in ("library", "adapter", "fallback")}
            differs = sum(p.instruction != r.description for p, r in zip(plans[s], rows, strict=True))
            out[s] = {"rougeL": score["served"], "rougeL_description_in_front": score["description"],
                      "paths": paths[s], "instruction_from": sources, "served_differs": differs}
        out["library_top1_is_own_task"] = round(float(np.mean(top1)), 4) if own_in_library else None
        return out

    def plan(self, rows: Sequence[Row], strategies: Sequence[str]) -> tuple[dict, dict, list[bool]]:
        """Per strategy: each row's `Planned` adapter and prompts, the paths taken; and whether each row's top library
        match (under the last strategy) is its own task."""
        vectors = self.strategy.embed([r.description for r in rows])  # (n_rows, dim)
        generated = self.gen.generate_embedded(torch.from_numpy(vectors), [r.description for r in rows])
        plans, paths = {}, {}
        for s in strategies:
            decisions = self.strategy.decide_vectors(vectors, s)
            plans[s] = [self._planned(d, g, r) for d, g, r in zip(decisions, generated, rows, strict=True)]
            paths[s] = {p: sum(d.path == p for d in decisions) for p in ("retrieve", "mix", "generate")}
            paths[s]["by_instruction"] = sum(bool(d.matches) and d.matches[0].key == "instruction" for d in decisions)
        top1 = [bool(d.matches) and d.matches[0].name == r.task for d, r in zip(decisions, rows, strict=True)]
        return plans, paths, top1

    def _planned(self, decision, generated, row: Row) -> Planned:
        """The decision's adapter; in front of the input, the instruction serving would put there (the description
        when the adapter carries none), or the description."""
        from generator.prompt import task_prompt

        key, adapter = self._adapter(decision, generated)
        carried = self.strategy.instruction(decision, None if isinstance(adapter, str) else adapter)
        source = "fallback" if not carried else "library" if decision.path == "retrieve" else "adapter"
        instruction = carried or row.description
        prompts = {"served": task_prompt(self.tok, instruction, row.input),
                   "description": task_prompt(self.tok, row.description, row.input)}
        return Planned(key, adapter, instruction, source, prompts)

    def _adapter(self, decision, generated) -> tuple[str, object]:
        """(a key naming the adapter, the adapter) for one decision."""
        if decision.path == "retrieve":
            return f"lib:{decision.library_id}", decision.library_id
        if decision.path == "generate":
            return f"gen:{generated.metadata['description']}", generated
        key = "mix:" + ",".join(f"{i or 'gen:' + generated.metadata['description']}:{w:.4f}"
                                for i, w in decision.mixture)
        return key, self.strategy.build(decision, generated)

    def _answer(self, prompts: list[str], adapters: list) -> list[str]:
        from generator.apply import AdapterBank
        from generator.inference import generate_text

        loaded = [self.strategy.library.load(a) if isinstance(a, str) else a for a in adapters]
        bank = AdapterBank.from_adapters(loaded, self.gen.spec, self.ecfg.device)
        lora = bank.gather(torch.arange(len(loaded))[:, None], torch.ones(len(loaded), 1))
        return generate_text(self.model, self.tok, prompts, self.injector, lora, self.ecfg.max_new_tokens)


def outcomes(retrieved: Sequence[float], generated: Sequence[float], top1: Sequence[bool]) -> dict:
    """Served ROUGE-L per row (retrieve's, generate's) summed by outcome: the retrieved adapter is the row's own
    task's or another's, and the generated adapter (with their row counts)."""
    groups = {"retrieve_own": [x for x, t in zip(retrieved, top1, strict=True) if t],
              "retrieve_other": [x for x, t in zip(retrieved, top1, strict=True) if not t],
              "generate": list(generated)}
    return {k: {"rows": len(v), "sum": round(float(np.sum(v)), 3)} for k, v in groups.items()}


def _task_mean(scores: Sequence[float], tasks: Sequence[str]) -> float:
    """Mean over tasks of per-task means (the house convention)."""
    per: dict[str, list[float]] = {}
    for s, t in zip(scores, tasks, strict=True):
        per.setdefault(t, []).append(s)
    return float(np.mean([np.mean(v) for v in per.values()])) if per else float("nan")


def run_eval(gen, ecfg: EvalStrategyConfig, scfg: StrategyConfig | None = None) -> dict:
    """The three settings' ROUGE-L per strategy; `gen` is the generator (its encoder embeds descriptions)."""
    train, dev = load_sni(ecfg.sni_dir, "train"), load_sni(ecfg.sni_dir, "dev")
    sni = train | dev
    dev_dirs = {n: p for n, p in peft_dirs(ecfg.dev_library).items() if n in dev}
    with tempfile.TemporaryDirectory(prefix="hyperlora-eval-strategy-") as tmp:
        library, origin = build_library(Path(tmp) / "library", gen, train, ecfg)
        strategy = DescriptionStrategy(library, gen.encoder, scfg or StrategyConfig())
        runner = Runner(gen, strategy, ecfg)
        own = {r.name: r.id for r in library.list()}
        result = {"library": {"adapters": len(own), "origin": origin, "dev_adapters": len(dev_dirs)},
                  "thresholds": asdict(strategy.thresholds), "eval": asdict(ecfg), "settings": {}}
        a_names = spread(sorted(own), ecfg.tasks)
        dev_names = spread(sorted(dev_dirs) or sorted(dev), ecfg.tasks)
        todo = [("a", a_names, True), ("b", dev_names, False)] + ([("c", dev_names, False)] if dev_dirs else [])
        if ecfg.paraphrases == "calibration":  # train tasks only: never a dev task
            lacking = spread(sorted(set(train) - set(own)), ecfg.tasks)
            todo = [("a", a_names, True)] + ([("lacking", lacking, True)] if lacking else [])
        for key, names, paraphrase in todo:
            if key == "c":  # the dev tasks' own adapters join the library (learned after the hypernetwork)
                for n in names:
                    own[n] = _add(library, sni, n, dev_dirs[n])
            rows = setting_rows(sni, names, ecfg.inputs, paraphrase, PARAPHRASES[ecfg.paraphrases])
            logger.info("setting (%s) %s: %d tasks, %d rows", key, SETTINGS[key], len(names), len(rows))
            scores = runner.run(rows, STRATEGY_NAMES, own_in_library=key in ("a", "c"))
            result["settings"][key] = {"what": SETTINGS[key], "tasks": list(names), "rows": len(rows), **scores}
    result["outcome_quality"] = outcome_quality(result["settings"])
    return result


def outcome_quality(settings: dict) -> dict[str, float | None]:
    """Mean served ROUGE-L of each outcome over every setting's rows: a task's own adapter retrieved, another
    task's, a generated adapter: what `hyperlora train strategy --quality OWN GENERATED OTHER` takes (from a run
    with `--paraphrases calibration`, which reads train tasks only)."""
    out = {}
    for k in ("retrieve_own", "generate", "retrieve_other"):
        n = sum(s["outcomes"][k]["rows"] for s in settings.values())
        out[k] = round(sum(s["outcomes"][k]["sum"] for s in settings.values()) / n, 2) if n else None
    return out


def format_eval(result: dict) -> str:
    lib = result["library"]
    t = result["thresholds"]
    lines = ["# Description strategy: generate, retrieve or auto", "",
             f"Library: {lib['adapters']} train-task adapters ({lib['origin']}); {lib['dev_adapters']} dev-task "
             f"adapters for (c). Thresholds: match {t['match_threshold']:.3f} (margin {t['match_margin']:.3f}"
             + ("; on projected scores" if t.get("projection") else "")
             + (f", the cosine before the projection >= {t['raw_threshold']:.3f}" if t.get("projection") and
                t.get("raw_threshold", -1.0) > -1.0 else "") + "), "
             f"near {t['near_threshold']:.3f}, instruction match {t['instruction_threshold']:.3f} (margin "
             f"{t['instruction_margin']:.3f}), out of scope under {t['scope_threshold']:.3f}.", "",
             f"ROUGE-L (mean over tasks of per-task means; {result['eval']['inputs']} test inputs per task, greedy, "
             f"{result['eval']['max_new_tokens']} new tokens) under two prompt conventions, scored in the same run:",
             "",
             "- **served** (the issue's targets are judged on this one): in front of the input goes the instruction "
             "the service would put there, the one the served adapter carries: a library adapter's own instruction "
             "(a trained LoRA's task definition) on the retrieve path, the description for a generated adapter and "
             "for a mixture (a mixed adapter carries its generated part's instruction).",
             "- **description in front**: the row's description goes in front for every strategy, whatever the "
             "adapter (the convention of the earlier tables; the service never sends this for a library adapter).",
             "", "Served:", ""]
    lines += _table(result, "rougeL", "auto's paths (retrieve (by instruction) / mix / generate)",
                    lambda s: "{retrieve} ({by_instruction}) / {mix} / {generate}".format(**s["auto"]["paths"]))
    q = result.get("outcome_quality") or {}
    if q:
        lines += ["", f"Served ROUGE-L by outcome, over every row above: the row's own task's adapter retrieved "
                  f"{q['retrieve_own']}, a generated adapter {q['generate']}, another task's adapter retrieved "
                  f"{q['retrieve_other']} (`hyperlora train strategy --quality` takes these, from a run with "
                  "`--paraphrases calibration`)."]
    lines += ["", "Description in front for every strategy:", ""]
    lines += _table(result, "rougeL_description_in_front", "rows whose served prompt differs (retrieve / auto)",
                    lambda s: f"{s['retrieve']['served_differs']} / {s['auto']['served_differs']}")
    return "\n".join(lines)


def _table(result: dict, column: str, last: str, extra: Callable[[dict], str]) -> list[str]:
    rows = [f"| setting | tasks | generate | retrieve | auto | {last} |", "|---|---:|---:|---:|---:|---|"]
    for key, s in result["settings"].items():
        rows.append(f"| ({key}) {s['what']} | {len(s['tasks'])} | {s['generate'][column]:.2f} | "
                    f"{s['retrieve'][column]:.2f} | **{s['auto'][column]:.2f}** | {extra(s)} |")
    return rows


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    name = "strategy" if result["eval"]["paraphrases"] == "evaluation" else "strategy-calibration"
    return write_report(result, out_dir, name, format_eval(result))
