"""`hyperlora eval strategy`: ROUGE-L of the generate / retrieve / auto strategies (retriever/strategy.py) on
(a) train tasks described by held-out paraphrases (descriptions 150-199, never used in calibration or keys),
(b) dev tasks described by their definitions, and (c) the same dev tasks with their own adapter added to the library.

The library is built in a temporary directory from `--library` (PEFT folders named by train task, as
`train lora-library` writes them), keyed by each task's first 8 descriptions and 20 first inputs, as the default
library is; `--dev-library` holds the dev tasks' adapters for (c). Without `--library`, the generator makes a
stand-in library from each task's first description (say so when reporting). Prompts follow the one prompt
convention (generator.prompt.task_prompt: the description as instruction + the input); generation is greedy and
stops at <|im_end|>. Answers of a row are computed once per distinct adapter, so strategies that agree share them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.models import DEFAULT_BASE_MODEL
from generator.peft_io import CONFIG_NAME
from retriever.calibrate import EVALUATION_SLICE
from retriever.evaluate import heldout, rouge_l, spread, write_report
from retriever.library import AdapterLibrary
from retriever.strategy import STRATEGY_NAMES, DescriptionStrategy, StrategyConfig
from retriever.tasks import load_sni

logger = logging.getLogger(__name__)
SETTINGS = {"a": "train tasks, held-out paraphrases", "b": "dev tasks, definitions",
            "c": "dev tasks, definitions, own adapter in the library"}
KEY_DESCRIPTIONS, KEY_SAMPLES = 8, 20


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

    def __post_init__(self) -> None:
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


def setting_rows(sni: dict[str, dict], names: Sequence[str], n_inputs: int, paraphrase: bool) -> list[Row]:
    """Each task's last test-portion inputs; the description is a held-out paraphrase (one per input) or the
    definition."""
    rows = []
    for j, (task, x, refs) in enumerate(heldout(sni, names, n_inputs)):
        held = sni[task]["descriptions"][EVALUATION_SLICE]
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
        from generator.prompt import task_prompt

        vectors = self.strategy.embed([r.description for r in rows])  # (n_rows, dim)
        generated = self.gen.generate_embedded(torch.from_numpy(vectors), [r.description for r in rows])
        plans, paths = {}, {}
        for s in strategies:
            decisions = self.strategy.decide_vectors(vectors, s)
            plans[s] = [self._adapter(d, g) for d, g in zip(decisions, generated, strict=True)]
            paths[s] = {p: sum(d.path == p for d in decisions) for p in ("retrieve", "mix", "generate")}
            paths[s]["by_instruction"] = sum(bool(d.matches) and d.matches[0].key == "instruction" for d in decisions)
        top1 = [bool(d.matches) and d.matches[0].name == r.task for d, r in zip(decisions, rows, strict=True)]
        prompts = [task_prompt(self.tok, r.description, r.input) for r in rows]
        todo = sorted({(key, p) for s in strategies for (key, _), p in zip(plans[s], prompts, strict=True)}
                      - set(self.answers))
        adapters = {key: ad for s in strategies for key, ad in plans[s]}
        bar = tqdm(total=len(todo), desc="answering", mininterval=2.0)
        for start in range(0, len(todo), self.ecfg.batch_size):
            chunk = todo[start: start + self.ecfg.batch_size]
            outs = self._answer([p for _, p in chunk], [adapters[k] for k, _ in chunk])
            self.answers.update(zip(chunk, outs, strict=True))
            bar.update(len(chunk))
        bar.close()
        out = {}
        for s in strategies:
            scores = [rouge_l(self.answers[(key, p)], r.references, self.scorer)
                      for (key, _), p, r in zip(plans[s], prompts, rows, strict=True)]
            out[s] = {"rougeL": round(_task_mean(scores, [r.task for r in rows]), 2), "paths": paths[s]}
        out["library_top1_is_own_task"] = round(float(np.mean(top1)), 4) if own_in_library else None
        return out

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
        for key, names, paraphrase in todo:
            if key == "c":  # the dev tasks' own adapters join the library (learned after the hypernetwork)
                for n in names:
                    own[n] = _add(library, sni, n, dev_dirs[n])
            rows = setting_rows(sni, names, ecfg.inputs, paraphrase)
            logger.info("setting (%s) %s: %d tasks, %d rows", key, SETTINGS[key], len(names), len(rows))
            scores = runner.run(rows, STRATEGY_NAMES, own_in_library=key != "b")
            result["settings"][key] = {"what": SETTINGS[key], "tasks": list(names), "rows": len(rows), **scores}
    return result


def format_eval(result: dict) -> str:
    lib = result["library"]
    t = result["thresholds"]
    lines = ["# Description strategy: generate, retrieve or auto", "",
             f"Library: {lib['adapters']} train-task adapters ({lib['origin']}); {lib['dev_adapters']} dev-task "
             f"adapters for (c). Thresholds: match {t['match_threshold']:.3f} (margin {t['match_margin']:.3f}), "
             f"near {t['near_threshold']:.3f}, instruction match {t['instruction_threshold']:.3f} (margin "
             f"{t['instruction_margin']:.3f}), out of scope under {t['scope_threshold']:.3f}.", "",
             f"ROUGE-L (mean over tasks of per-task means; {result['eval']['inputs']} test inputs per task, greedy, "
             f"{result['eval']['max_new_tokens']} new tokens, the description as instruction in the prompt):", "",
             "| setting | tasks | generate | retrieve | auto | auto's paths (retrieve (by instruction) / mix / "
             "generate) |",
             "|---|---:|---:|---:|---:|---|"]
    for key, s in result["settings"].items():
        p = s["auto"]["paths"]
        lines.append(f"| ({key}) {s['what']} | {len(s['tasks'])} | {s['generate']['rougeL']:.2f} | "
                     f"{s['retrieve']['rougeL']:.2f} | **{s['auto']['rougeL']:.2f}** | "
                     f"{p['retrieve']} ({p.get('by_instruction', 0)}) / {p['mix']} / {p['generate']} |")
    return "\n".join(lines)


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    return write_report(result, out_dir, "strategy", format_eval(result))
