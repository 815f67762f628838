"""`eval quality`, scoring half: predictions.json -> results/quality.{json,md,png}.

Per method and task set: ROUGE-L and exact match as the mean over tasks of per-task means, each with a 95%
bootstrap interval over tasks; and "harm": the tasks where a method with an adapter scores more than
`HARM_POINTS` below the same prompt without it (its reference, named in the record's `prompt` kind). The
dev split is reported whole and on the first-version dev tasks alone (data version 1's 19 tasks).
"""

from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

from training.metrics import exact_match, rouge_l

HARM_POINTS = 2.0  # a task is harmed when the adapter costs more than this many ROUGE-L points
BOOTSTRAP = 2000  # resamples of the task set for the 95% intervals
REFERENCES = {"input": "base", "instruction": "base + instruction", "icl": "2-shot ICL"}
BASELINES = ("base", "base + instruction", "2-shot ICL", "multi-task LoRA + instruction",
             "multi-task LoRA + instruction + 2 examples")
# The dev tasks of the data's first version (../shared/data/sni/README.md: unchanged in version 2).
DEV_V1 = ("task019_mctaco_temporal_reasoning_category", "task080_piqa_answer_generation",
          "task081_piqa_wrong_answer_generation", "task097_conala_remove_duplicates",
          "task098_conala_list_intersection",
          "task1286_openbookqa_question_answering", "task1312_amazonreview_polarity_classification",
          "task1481_gene_extraction_bc2gm_dataset", "task1516_imppres_naturallanguageinference",
          "task1557_jfleg_answer_generation", "task1560_blimp_binary_classification", "task199_mnli_classification",
          "task202_mnli_contradiction_classification", "task228_arc_answer_generation_easy",
          "task362_spolin_yesand_prompt_response_sub_classification", "task386_semeval_2018_task3_irony_detection",
          "task613_politifact_text_generation", "task827_copa_commonsense_reasoning",
          "task970_sherliic_causal_relationship")
TITLES = {"dev": "Held-out dev tasks (never trained on)", "dev-v1": "The 19 first-version dev tasks",
          "train": "Train tasks: oracle LoRAs vs generated"}


def bootstrap_ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` over resamples of them."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(BOOTSTRAP))
    return means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def _summary(by_task: dict[str, dict]) -> dict:
    r = [s["rougeL"] for s in by_task.values()]
    e = [s["exact_match"] for s in by_task.values()]
    return {"rougeL": sum(r) / len(r), "rougeL_ci": bootstrap_ci(r), "exact_match": sum(e) / len(e),
            "exact_match_ci": bootstrap_ci(e), "tasks": len(by_task),
            "instances": sum(s["n"] for s in by_task.values()), "per_task": by_task}


def _harm(res: dict, kinds: dict[str, str]) -> None:
    """Add `reference`, `harmed` (task names) and `delta` (per task) to every adapter method of one task set."""
    for method, r in res.items():
        ref = REFERENCES.get(kinds.get(method, ""))
        if ref is None or ref == method or ref not in res:
            continue
        base = res[ref]["per_task"]
        delta = {t: s["rougeL"] - base[t]["rougeL"] for t, s in r["per_task"].items() if t in base}
        r.update(reference=ref, delta=delta, harmed=sorted(t for t, d in delta.items() if d < -HARM_POINTS))


def load_predictions(pred_path: str | Path) -> dict:
    """A predictions file as written by training.evaluate (.json, or gzipped .json.gz)."""
    path = Path(pred_path)
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


def score(pred_path: str | Path) -> dict:
    """Per task set and method: per-task means, their average with 95% intervals, and harm against the reference."""
    pred = load_predictions(pred_path)
    per: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    kinds: dict[str, str] = {}
    for r in pred["records"]:
        per[(r["split"], r["method"])][r["task"]].append((rouge_l(r["prediction"], r["references"]),
                                                          exact_match(r["prediction"], r["references"])))
        if r.get("adapter"):
            kinds[r["method"]] = r.get("prompt", "")
    table: dict[str, dict] = {}
    for (split, method), tasks in per.items():
        by_task = {t: {"rougeL": sum(x for x, _ in v) / len(v), "exact_match": sum(y for _, y in v) / len(v),
                       "n": len(v)} for t, v in sorted(tasks.items())}
        table.setdefault(split, {})[method] = _summary(by_task)
        v1 = {t: s for t, s in by_task.items() if t in DEV_V1}
        if split == "dev" and v1:
            table.setdefault("dev-v1", {})[method] = _summary(v1)
    for res in table.values():
        _harm(res, kinds)
    return {"command": pred.get("command", ""), "base_model": pred.get("base_model"), "device": pred.get("device"),
            "max_new_tokens": pred.get("max_new_tokens"), "harm_points": HARM_POINTS, "results": table}


def _order(methods):
    first = [m for m in BASELINES if m in methods]
    return first + sorted(m for m in methods if m not in first)


def _table(res: dict) -> list[str]:
    lines = ["| method | ROUGE-L [95% CI] | exact match [95% CI] | harmed tasks (vs) |", "|---|---:|---:|---|"]
    for m in _order(res):
        r = res[m]
        harm = f"{len(r['harmed'])} of {len(r['delta'])} ({r['reference']})" if "harmed" in r else ""
        lines.append(f"| {m} | {r['rougeL']:.1f} [{r['rougeL_ci'][0]:.1f}, {r['rougeL_ci'][1]:.1f}] | "
                     f"{r['exact_match']:.1f} [{r['exact_match_ci'][0]:.1f}, {r['exact_match_ci'][1]:.1f}] | "
                     f"{harm} |")
    return lines


def _per_task(res: dict) -> list[str]:
    methods = _order(res)
    tasks = sorted({t for r in res.values() for t in r["per_task"]})
    lines = ["<details><summary>per task ROUGE-L</summary>", "", "| task | " + " | ".join(methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for t in tasks:
        cells = [f"{res[m]['per_task'][t]['rougeL']:.1f}" if t in res[m]["per_task"] else "" for m in methods]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines + ["", "</details>", ""]


def markdown(q: dict) -> str:
    lines = [f"Produced by: `{q['command']}`", ""] + ([q["note"], ""] if q.get("note") else []) + [
        f"Base model {q['base_model']}, greedy decoding, at most {q['max_new_tokens']} new tokens, stopping at "
        "`<|im_end|>`. Every prompt but `base` has the task's definition as the instruction in front of the input "
        "(generator.prompt). Scores are means over tasks of per-task means (0-100), with 95% bootstrap intervals "
        f"over tasks. Harmed: tasks where the adapter scores more than {q['harm_points']:g} points below the same "
        "prompt without it.", ""]
    for split in ("dev", "dev-v1", "train"):
        if split in q["results"]:
            lines += [f"## {TITLES[split]}", "", *_table(q["results"][split]), "", *_per_task(q["results"][split])]
    return "\n".join(lines)


def plot(q: dict, out: Path) -> None:
    """Per-task ROUGE-L deltas of every adapter method against its reference prompt (one dot per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in ("dev", "train") if s in q["results"]]
    fig, axes = plt.subplots(1, len(splits), figsize=(8 * len(splits), 6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=False):
        res = q["results"][split]
        methods = [m for m in _order(res) if "delta" in res[m]][::-1]
        for y, m in enumerate(methods):
            d = list(res[m]["delta"].values())
            jitter = [y + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(d))]
            ax.scatter(d, jitter, s=10, c=["#c0392b" if v < -q["harm_points"] else "#2b7bba" for v in d])
            mean = sum(d) / len(d)
            ax.plot([mean, mean], [y - 0.35, y + 0.35], c="k", lw=2)
        ax.axvline(0, c="#999999", lw=1)
        ax.set_yticks(range(len(methods)), [f"{m}  (vs {res[m]['reference']})" for m in methods], fontsize=7)
        ax.set_xlabel("ROUGE-L change per task against the same prompt without the adapter (bar: mean)")
        ax.set_title(TITLES[split])
    fig.suptitle(f"hyperlora: what an adapter changes, task by task ({q['base_model']})")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(pred_path: str | Path, out_dir: str | Path = "results", note: str = "") -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    q = score(pred_path)
    if note:
        q["note"] = note
    (out / "quality.json").write_text(json.dumps(q, indent=1))
    (out / "quality.md").write_text(markdown(q))
    plot(q, out / "quality.png")
    return q
