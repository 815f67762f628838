"""Summarise the T2L variants a GPU job trained: `python -m training.variants WORK > variants.json`.

One entry per `WORK/t2l-*/hypernet.json`: its training mode and steps, the held-out train-task loss that picks
the variant (best step, curve, loss by adapter strength), for a residual network its base adapter, and with
relabelled copies the loss on the held-out tasks' copies. `--summary` prints a line per variant instead: the best
step, the mean of the checks at steps 200-450, and how many checks beat step 0 (the base adapter alone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIELDS = ("mode", "steps", "best_step", "best_val_loss", "final_loss", "val_curve", "val_loss_by_strength",
          "train_tasks", "base_adapter", "seed", "init_seed", "relabel_copies", "val_relabelled_curve",
          "val_relabelled_by_strength")


def summarise(work: str | Path) -> dict[str, dict]:
    out = {}
    for f in sorted(Path(work).glob("t2l-*/hypernet.json")):
        extra = json.loads(f.read_text()).get("extra", {})
        out[f.parent.name] = {k: extra.get(k) for k in FIELDS}
    return out


def curve_line(name: str, run: dict) -> str:
    """One variant's held-out curve in a line (the README's table of curves)."""
    curve = run.get("val_curve") or []
    line = f"{name}: best {run.get('best_val_loss')} at step {run.get('best_step')}"
    mid = [v for s, v in curve if 200 <= s <= 450]
    if mid:
        line += f", mean of steps 200-450 {sum(mid) / len(mid):.4f}"
    if curve and curve[0][0] == 0:
        line += f", {sum(v < curve[0][1] for _, v in curve[1:])} of {len(curve) - 1} checks below step 0"
    if run.get("val_relabelled_curve"):
        line += f", relabelled held-out {run['val_relabelled_curve'][0][1]} -> {run['val_relabelled_curve'][-1][1]}"
    return line


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--summary"]
    if len(args) != 1:
        raise SystemExit("usage: python -m training.variants WORK_DIR [--summary]")
    runs = summarise(args[0])
    print("\n".join(curve_line(k, r) for k, r in runs.items()) if "--summary" in sys.argv else json.dumps(runs,
                                                                                                         indent=1))
