"""`eval quality`, scoring half: predictions.json -> results/quality.{json,md,png}."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from training.metrics import exact_match, rouge_l

BASELINES = ("base", "base + definition", "2-shot ICL", "multi-task LoRA")


def score(pred_path: str | Path) -> dict:
    """Per method and split: per-task means and the average over tasks (each task weighs the same)."""
    pred = json.loads(Path(pred_path).read_text())
    per: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in pred["records"]:
        per[(r["split"], r["method"])][r["task"]].append((rouge_l(r["prediction"], r["references"]),
                                                          exact_match(r["prediction"], r["references"])))
    table = {}
    for (split, method), tasks in per.items():
        by_task = {t: {"rougeL": sum(x for x, _ in v) / len(v), "exact_match": sum(y for _, y in v) / len(v),
                       "n": len(v)} for t, v in sorted(tasks.items())}
        table.setdefault(split, {})[method] = {
            "rougeL": sum(s["rougeL"] for s in by_task.values()) / len(by_task),
            "exact_match": sum(s["exact_match"] for s in by_task.values()) / len(by_task),
            "tasks": len(by_task), "instances": sum(s["n"] for s in by_task.values()), "per_task": by_task,
        }
    return {"command": pred.get("command", ""), "base_model": pred.get("base_model"), "device": pred.get("device"),
            "max_new_tokens": pred.get("max_new_tokens"), "results": table}


def _order(methods):
    first = [m for m in BASELINES if m in methods]
    return first + sorted(m for m in methods if m not in first)


def markdown(q: dict) -> str:
    lines = [f"Produced by: `{q['command']}`", ""] + ([q["note"], ""] if q.get("note") else []) + [
             f"Base model {q['base_model']}, greedy decoding, at most {q['max_new_tokens']} new tokens, "
             "stopping at `<|im_end|>`. Scores are means over tasks of per-task means (0-100).", ""]
    titles = {"dev": "Held-out dev tasks (never trained on)", "train": "Train tasks: oracle LoRAs vs generated"}
    for split in ("dev", "train"):
        if split not in q["results"]:
            continue
        res = q["results"][split]
        lines += [f"## {titles[split]}", "", "| method | ROUGE-L | exact match | tasks | instances |",
                  "|---|---:|---:|---:|---:|"]
        for m in _order(res):
            r = res[m]
            lines.append(f"| {m} | {r['rougeL']:.1f} | {r['exact_match']:.1f} | {r['tasks']} | {r['instances']} |")
        lines.append("")
        tasks = sorted({t for r in res.values() for t in r["per_task"]})
        methods = _order(res)
        lines += ["<details><summary>per task ROUGE-L</summary>", "", "| task | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * len(methods)]
        for t in tasks:
            cells = [f"{res[m]['per_task'][t]['rougeL']:.1f}" if t in res[m]["per_task"] else "" for m in methods]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def plot(q: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in ("dev", "train") if s in q["results"]]
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=False):
        res = q["results"][split]
        methods = _order(res)
        vals = [res[m]["rougeL"] for m in methods]
        colors = ["#999999" if m in BASELINES or m == "base" else "#2b7bba" for m in methods]
        ax.barh(methods[::-1], vals[::-1], color=colors[::-1])
        for y, v in enumerate(vals[::-1]):
            ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
        ax.set_xlabel("ROUGE-L (mean over tasks)")
        ax.set_title({"dev": "held-out dev tasks", "train": "train tasks"}[split])
    fig.suptitle(f"hyperlora quality on {q['base_model']}")
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
