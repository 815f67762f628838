"""Summarise the T2L variants a GPU job trained: `python -m training.variants WORK > variants.json`.

One entry per `WORK/t2l-*/hypernet.json`: its training mode and steps, the held-out train-task loss that picks
the variant (best step, curve, loss by adapter strength) and, for a residual network, its base adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIELDS = ("mode", "steps", "best_step", "best_val_loss", "final_loss", "val_curve", "val_loss_by_strength",
          "train_tasks", "base_adapter")


def summarise(work: str | Path) -> dict[str, dict]:
    out = {}
    for f in sorted(Path(work).glob("t2l-*/hypernet.json")):
        extra = json.loads(f.read_text()).get("extra", {})
        out[f.parent.name] = {k: extra.get(k) for k in FIELDS}
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m training.variants WORK_DIR")
    print(json.dumps(summarise(sys.argv[1]), indent=1))
