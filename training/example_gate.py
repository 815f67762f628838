"""Gate a generated adapter on the prompt's own examples (generator.scoring.gate_from_examples): chosen on held-out
train tasks, then measured on dev.

With two in-context examples in the prompt, the shipped rule weakens the adapter to its recorded strength (0.75);
on 8 of 43 dev tasks it still scores > 2 points under the examples alone. The gate answers each example from the
other (greedy, with the adapter at that strength and without it) and keeps the adapter unless the base model
reproduces the examples better. This job:
1. held-out train tasks (the checkpoint's `val_tasks`, never dev): for every (task, adapter from its first
   paraphrase / its definition) the answer loss with 2 examples at strength 0 and at the recorded strength, on 16
   of the task's training instances, and the gate's choice from the task's 2 examples: the gated loss against the
   fixed strength's (the rule a server would adopt only if it is not worse there);
2. dev: the gate's choice per task for the adapter of the quality table's row, and a predictions row that takes
   each task's answers from `NAME xS + instruction + 2 examples` or from `2-shot ICL` accordingly (no new answers
   are generated: the gate decides from the examples alone), merged into the predictions file.

    python -m training.example_gate --checkpoint generator/checkpoints/smollm2-t2l --embeddings emb.safetensors \\
        --predictions results/predictions.json.gz --name t2l-res-m-lr2 --out results/example-gate.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from generator.hypernet.checkpoint import load_checkpoint
from generator.scoring import gate_from_examples
from training.config import TrainConfig
from training.data import DEFAULT_DATA, load_split
from training.embeddings import task_embeddings
from training.strength import adapter_from, checkpoint_parser, heldout_icl_loss

logger = logging.getLogger(__name__)
ICL_ROW = "2-shot ICL"


def _examples(task) -> list[tuple[str, str]]:
    return [(e.input, e.outputs[0]) for e in task.positive_examples[:2]]


def heldout(net, model, tok, injector, spec, tasks, emb, strength: float, device, per_task: int) -> dict:
    """Held-out answer loss: strength 0, the fixed strength, and the gate's choice between them, per item."""
    items = heldout_icl_loss(net, model, tok, injector, tasks, emb, [0.0, strength], device, per_task)["items"]
    chosen, scores = [], []
    keys = [(t, e) for t in tasks for e in (emb[t.name][:1], emb[f"{t.name}::definition"][:1])]
    for t, e in tqdm(keys, desc="held-out gates", mininterval=5.0):
        if len(_examples(t)) < 2:
            chosen.append(strength)
            scores.append(None)
            continue
        keep, score = gate_from_examples(model, tok, injector, spec, adapter_from(net, spec, e.to(device), strength),
                                         t.definition, _examples(t), device)
        chosen.append(strength if keep else 0.0)
        scores.append(score)
    gated = [r[str(s)] for r, s in zip(items, chosen, strict=True)]
    mean = {k: round(sum(r[k] for r in items) / len(items), 4) for k in ("0.0", str(strength))}
    return {"loss": mean | {"gate": round(sum(gated) / len(gated), 4)}, "kept": sum(c == strength for c in chosen),
            "items": len(items), "scores": scores}


def dev_row(net, model, tok, injector, spec, dev, emb, strength: float, device, predictions: dict, name: str
            ) -> tuple[list[dict], dict]:
    """The gated dev row (records copied per task from the adapter's row or the examples-only row), and the gate's
    choice per task."""
    source = f"{name} x{strength:g} + instruction + 2 examples"
    gated_name = f"{name} x{strength:g} gated by examples + instruction + 2 examples"
    by: dict[tuple[str, str], list[dict]] = {}
    for r in predictions["records"]:
        if r["split"] == "dev":
            by.setdefault((r["method"], r["task"]), []).append(r)
    choice, records = {}, []
    for t in tqdm(dev, desc="dev gates", mininterval=5.0):
        keep, score = True, None
        if len(_examples(t)) >= 2:
            keep, score = gate_from_examples(model, tok, injector, spec,
                                             adapter_from(net, spec, emb[t.name][:1].to(device), strength),
                                             t.definition, _examples(t), device)
        choice[t.name] = {"adapter": keep, "scores": score}
        records += [dict(r, method=gated_name, adapter=keep) for r in by[(source if keep else ICL_ROW, t.name)]]
    return records, choice


def run(args: argparse.Namespace) -> dict:
    from training.report import load_predictions
    from training.runtime import load_frozen

    cfg = TrainConfig(base_model=args.base_model, data=args.data, device=args.device, dtype=args.dtype)
    data = cfg.data or DEFAULT_DATA
    net = load_checkpoint(args.checkpoint, None, cfg.device).eval()
    strength = float(net.cfg.extra.get("strength_with_examples") or 1.0)
    held = set(net.cfg.extra.get("val_tasks") or [])
    train = [t for t in load_split("train", data) if t.name in held]
    dev = load_split("dev", data)
    emb = task_embeddings(train + dev, args.embeddings)
    model, tok, spec, injector = load_frozen(cfg, net.cfg.target_modules)
    result = {"checkpoint": str(args.checkpoint), "strength": strength, "heldout_tasks": sorted(held)}
    with torch.no_grad():
        if args.heldout_per_task:  # the adoption test (slow on a CPU: forward passes over long prompts)
            result["heldout"] = heldout(net, model, tok, injector, spec, train, emb, strength, cfg.device,
                                        args.heldout_per_task)
            h = result["heldout"]["loss"]
            logger.info("held-out loss with 2 examples: base %.4f, fixed %g %.4f, gated %.4f (adapter kept for %d of "
                        "%d)", h["0.0"], strength, h[str(strength)], h["gate"], result["heldout"]["kept"],
                        result["heldout"]["items"])
        if args.predictions:
            pred = load_predictions(args.predictions)
            records, result["dev"] = dev_row(net, model, tok, injector, spec, dev, emb, strength, cfg.device, pred,
                                             args.name)
            if args.merge:
                gated = {r["method"] for r in records}
                pred["records"] = [r for r in pred["records"] if r["method"] not in gated] + records
                pred["command"] = f"{pred.get('command', '')} ; then {args.command}"
                with gzip.open(args.predictions, "wt") as f:
                    json.dump(pred, f)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def parser() -> argparse.ArgumentParser:
    p = checkpoint_parser(__doc__, "t2l-res-m-lr2")
    p.add_argument("--predictions", default=None, help="predictions file (.json.gz) holding the dev rows")
    p.add_argument("--merge", action="store_true", help="add the gated dev row to the predictions file")
    p.add_argument("--heldout-per-task", type=int, default=16, help="held-out training instances per task for "
                   "the adoption test (0: skip it; on a CPU it takes an hour)")
    p.add_argument("--out", required=True, help="JSON result file")
    return p


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parser().parse_args()
    a.command = "python -m training.example_gate " + " ".join(sys.argv[1:])
    run(a)
