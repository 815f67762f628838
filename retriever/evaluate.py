"""`hyperlora eval routing`: routing accuracy on held-out inputs, and ROUGE-L of selection / mixture / fusion
when each input's own adapter is removed from the library (LoraRetriever's out-of-distribution setting).

Held-out inputs come from the test portion of each SNI task (its last 20%, as the training jobs split it);
the library's sample inputs are the first 20 instances.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retriever.config import RetrieverConfig
from retriever.index import build_index
from retriever.index_store import IndexStore
from retriever.keys import KIND_DESCRIPTION, KIND_INPUTS, assign_labels, embed_keys, kind_of
from retriever.library import AdapterLibrary
from retriever.router import Router
from retriever.tasks import load_sni

logger = logging.getLogger(__name__)
STRATEGIES = ("base", "oracle", "selection", "mixture", "fusion")


@dataclass
class EvalRoutingConfig:
    """What `eval routing` runs; the ROUGE-L part is kept small so it finishes on a CPU."""

    sni_dir: str = "../shared/data/sni"  # SNI data directory (evaluation data; the product never reads it)
    n_heldout: int = 10  # held-out inputs per task for routing accuracy (at most; the test portion's last ones)
    rouge_tasks: int = 8  # tasks in the generation part (spread evenly over the library's tasks)
    rouge_instances: int = 5  # held-out inputs per task in the generation part
    max_new_tokens: int = 16  # greedy tokens per answer
    top_k: int = 3  # adapters composed by mixture and fusion
    batch_size: int = 8  # prompts per generate call
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("n_heldout", "rouge_instances", "max_new_tokens", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rouge_tasks < 0:
            raise ValueError(f"rouge_tasks must be >= 0 (0 skips the generation part), got {self.rouge_tasks}")


TEST_FRACTION = 0.2  # the training jobs' split: the last 20% of a task's instances are never trained on


def test_portion(instances: Sequence[dict]) -> list[dict]:
    """The instances the training jobs hold out (training/data.py: the last 20%, at least one)."""
    usable = [i for i in instances if i["output"]]
    return usable[-max(1, round(len(usable) * TEST_FRACTION)):]


def heldout(sni: dict[str, dict], names: Sequence[str], n: int) -> list[tuple[str, str, list[str]]]:
    """(task, input, acceptable outputs) of the last `n` test-portion instances of each task."""
    return [(t, i["input"], i["output"]) for t in names for i in test_portion(sni[t]["instances"])[-n:]]


def _accuracy(routes, tasks: Sequence[str]) -> dict[str, float]:
    top1 = np.mean([bool(r.names) and r.names[0] == t for r, t in zip(routes, tasks, strict=True)])
    top3 = np.mean([t in r.names[:3] for r, t in zip(routes, tasks, strict=True)])
    return {"top1": round(float(top1), 4), "top3": round(float(top3), 4)}


def routing_accuracy(router: Router, sni: dict[str, dict], names: Sequence[str], n: int) -> tuple[dict, np.ndarray]:
    rows = heldout(sni, names, n)
    t0 = time.perf_counter()
    queries = router.embed([q for _, q, _ in rows])  # (n_queries, dim)
    embed_s = time.perf_counter() - t0
    routes = router.route_vectors(queries, 3)
    tasks = [t for t, _, _ in rows]
    per_task = {t: float(np.mean([r.names[:1] == [t] for r, tt in zip(routes, tasks, strict=True) if tt == t]))
                for t in names}
    worst = sorted(per_task.items(), key=lambda kv: kv[1])[:5]
    result = {**_accuracy(routes, tasks), "queries": len(rows), "tasks": len(names),
              "abstain_rate": round(float(np.mean([r.abstain for r in routes])), 4),
              "best_score_median": round(float(np.median([r.scores[0] for r in routes if r.scores])), 4),
              "embed_ms_per_input": round(1e3 * embed_s / len(rows), 2), "worst_tasks": dict(worst)}
    return result, queries


def key_mode_ablation(library: AdapterLibrary, encoder, cfg: RetrieverConfig, queries: np.ndarray,
                      tasks: Sequence[str]) -> dict[str, dict]:
    """Top-1/top-3 with description keys only, input keys only, and both (one embedding pass, exact search)."""
    records = library.list()
    labels = assign_labels([r.id for r in records])
    cache = IndexStore(library.index_dir, encoder, replace(cfg, key_mode="both")).cached_keys()
    vectors, key_labels, _ = embed_keys(records, encoder, replace(cfg, key_mode="both"), labels, cache)
    name_of = {labels[r.id] + kind: r.name for r in records for kind in (KIND_DESCRIPTION, KIND_INPUTS)}
    kinds = kind_of(key_labels)
    out = {}
    for mode, keep in (("description", kinds == KIND_DESCRIPTION), ("inputs", kinds == KIND_INPUTS),
                       ("both", np.ones_like(kinds, bool))):
        index = build_index(vectors[keep], key_labels[keep], cfg, "flat")
        _, found = index.search(queries, 6)
        ranked = [list(dict.fromkeys(name_of[int(lab)] for lab in row if lab >= 0))[:3] for row in found]
        out[mode] = {"top1": round(float(np.mean([r[:1] == [t] for r, t in zip(ranked, tasks, strict=True)])), 4),
                     "top3": round(float(np.mean([t in r for r, t in zip(ranked, tasks, strict=True)])), 4)}
    return out


def ood_abstain_rate(router: Router, sni_dir: str, n: int) -> dict:
    """How often the router abstains on inputs of tasks that have no adapter (the SNI dev split)."""
    dev = load_sni(sni_dir, "dev")
    library_names = {r.name for r in router.library.list()}
    names = [t for t in dev if t not in library_names]
    rows = heldout(dev, names, n)
    routes = router.route_vectors(router.embed([q for _, q, _ in rows]), 1)
    return {"tasks": len(names), "queries": len(rows),
            "abstain_rate": round(float(np.mean([r.abstain for r in routes])), 4),
            "best_score_median": round(float(np.median([r.scores[0] for r in routes if r.scores])), 4)}


def rouge_l(prediction: str, references: Sequence[str], scorer) -> float:
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def spread(names: Sequence[str], n: int) -> list[str]:
    """`n` names spread evenly over the sorted list (deterministic)."""
    names = sorted(names)
    if n >= len(names):
        return names
    return [names[int(i * len(names) / n)] for i in range(n)]


def generation_ood(router: Router, sni: dict[str, dict], names: Sequence[str], ecfg: EvalRoutingConfig) -> dict:
    """ROUGE-L of base, oracle (own adapter) and, with the own adapter excluded, selection / mixture / fusion."""
    from rouge_score import rouge_scorer

    from generator.apply import LoraInjector
    from generator.inference import generate_text
    from generator.models import load_base_model
    from generator.prompt import task_prompt
    from retriever.compose import build_composition

    library = router.library
    model, tok = load_base_model(library.spec.name if library.spec else "default", ecfg.device)
    targets = sorted({m for r in library.list() for m in r.target_modules})
    injector = LoraInjector(model, library.spec, targets)
    own = {r.name: r.id for r in library.list()}
    rows = heldout(sni, spread(names, ecfg.rouge_tasks), ecfg.rouge_instances)
    prompts = [task_prompt(tok, sni[t].get("definition"), q) for t, q, _ in rows]  # the task's instruction + input
    queries = router.embed([q for _, q, _ in rows])
    ood = router.route_vectors(queries, ecfg.top_k, exclude=[{own[t]} for t, _, _ in rows])
    cache: dict[str, object] = {}

    def load(i):
        if i not in cache:
            cache[i] = library.load(i)
        return cache[i]

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    examples = []
    bar = tqdm(total=len(STRATEGIES) * len(rows), desc="generating")
    for s in range(0, len(rows), ecfg.batch_size):
        sl = slice(s, s + ecfg.batch_size)
        for strategy in STRATEGIES:
            lora = None
            if strategy == "oracle":
                lora = build_composition("selection", library.spec).per_sample(
                    [_own_route(own[t]) for t, _, _ in rows[sl]], load)
            elif strategy != "base":
                lora = build_composition(strategy, library.spec).per_sample(ood[sl], load)
            outs = generate_text(model, tok, prompts[sl], injector, lora, ecfg.max_new_tokens)
            for (t, q, refs), o in zip(rows[sl], outs, strict=True):
                scores[strategy].append(rouge_l(o, refs, scorer))
                if len(examples) < 6 and strategy == "mixture":
                    examples.append({"task": t, "input": q[:200], "reference": refs[0][:100], "mixture": o[:100]})
            bar.update(len(outs))
    bar.close()
    sel_own = np.mean([r.names[0] == t for r, (t, _, _) in zip(router.route_vectors(queries, 1), rows, strict=True)])
    return {"rougeL": {s: round(float(np.mean(v)), 2) for s, v in scores.items()}, "inputs": len(rows),
            "tasks": sorted({t for t, _, _ in rows}), "max_new_tokens": ecfg.max_new_tokens, "top_k": ecfg.top_k,
            "in_library_top1_on_these_inputs": round(float(sel_own), 4), "examples": examples}


def _own_route(adapter_id: str):
    from retriever.router import Route

    return Route([adapter_id], [""], [1.0], [1.0], False)


def run_eval(library: AdapterLibrary, encoder, cfg: RetrieverConfig, ecfg: EvalRoutingConfig,
             generator_trained: bool | None = None) -> dict:
    sni = load_sni(ecfg.sni_dir, "train") | load_sni(ecfg.sni_dir, "dev")
    router = Router(library, encoder, cfg)
    records = library.list()
    names = sorted({r.name for r in records if r.name in sni})
    if not names:
        raise ValueError(f"no adapter in {library.root} is named after an SNI task in {ecfg.sni_dir}")
    sources: dict[str, int] = {}
    for r in records:
        sources[r.source] = sources.get(r.source, 0) + 1
    acc, queries = routing_accuracy(router, sni, names, ecfg.n_heldout)
    tasks = [t for t, _, _ in heldout(sni, names, ecfg.n_heldout)]
    result = {
        "library": {"adapters": len(records), "sources": sources, "index": router.index_type,
                    "generator_trained": generator_trained},
        "config": cfg.to_dict(), "eval": {k: v for k, v in ecfg.__dict__.items()},
        "routing": acc,
        "key_modes": key_mode_ablation(library, encoder, cfg, queries, tasks),
        "out_of_library": ood_abstain_rate(router, ecfg.sni_dir, ecfg.n_heldout),
    }
    if ecfg.rouge_tasks:
        result["generation_ood"] = generation_ood(router, sni, names, ecfg)
    return result


def format_eval(result: dict) -> str:
    acc, lib = result["routing"], result["library"]
    lines = ["# Routing evaluation", "",
             f"Library: {lib['adapters']} adapters ({', '.join(f'{v} {k}' for k, v in lib['sources'].items())}), "
             f"{lib['index']} index.", "",
             f"Held-out inputs: {acc['queries']} of {acc['tasks']} tasks (up to {result['eval']['n_heldout']} "
             "per task, from each task's test portion: its last 20% of instances).", "",
             "| keys | top-1 | top-3 |", "|---|---:|---:|",
             f"| configured ({result['config']['key_mode']}) | {acc['top1']:.3f} | {acc['top3']:.3f} |"]
    for mode, a in result["key_modes"].items():
        lines.append(f"| {mode} only | {a['top1']:.3f} | {a['top3']:.3f} |" if mode != "both" else
                     f"| both (max of the two) | {a['top1']:.3f} | {a['top3']:.3f} |")
    ood = result["out_of_library"]
    lines += ["", f"Abstain (best cosine < {result['config']['abstain_threshold']}): {acc['abstain_rate']:.1%} of "
              f"in-library inputs (median best score {acc['best_score_median']:.3f}), {ood['abstain_rate']:.1%} of "
              f"{ood['queries']} inputs of {ood['tasks']} tasks with no adapter "
              f"(median {ood['best_score_median']:.3f})."]
    gen = result.get("generation_ood")
    if gen:
        r = gen["rougeL"]
        lines += ["", f"ROUGE-L on {gen['inputs']} held-out inputs of {len(gen['tasks'])} tasks, "
                  f"{gen['max_new_tokens']} new tokens, greedy; selection/mixture/fusion with each input's own adapter "
                  f"removed (top-{gen['top_k']}):",
                  "", "| base model | own adapter | selection | mixture | fusion |", "|---:|---:|---:|---:|---:|",
                  "| " + " | ".join(f"{r[s]:.2f}" for s in STRATEGIES) + " |"]
    return "\n".join(lines)


def write_report(result: dict, out_dir: Path, stem: str, markdown: str) -> tuple[Path, Path]:
    """`result` as `{stem}.json` and its `markdown` as `{stem}.md` in `out_dir` (every retriever evaluation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(result, indent=2))
    md.write_text(markdown + "\n")
    return js, md


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    return write_report(result, out_dir, "routing", format_eval(result))
