"""Does averaging runs of one recipe help on unseen tasks? Measured on the train tasks SFT held out, never dev.

For residual T2L runs that share their held-out tasks and base adapter, the answer loss (instruction in the prompt,
a third of the samples with examples, as SFT validates) of: the base adapter alone (e.g. the multi-task LoRA), each
member, their weight average (`generator.hypernet.soup.soup`, only for members from one initialisation) and the mean
of their adapters (`MeanOfHypernets`), at each strength. On two item sets of the same held-out tasks:
  sft:   SFT's own validation items (train portions), which picked every member's step: optimistic for all of them;
  fresh: the same tasks' test portions, which nothing was picked on.
Per candidate it also counts the (task, description) items whose fresh loss is above the base adapter's.
With --save-soup the soup is written as a checkpoint (its strength chosen on the sft items, as SFT chooses it).

    python -m training.average --members C0 C1 C2 C3 --base-model DIR --embeddings emb.safetensors --device cuda \\
        --dtype bfloat16 --out DIR [--save-soup DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from generator.hypernet.checkpoint import load_checkpoint, save_checkpoint
from generator.hypernet.soup import MeanOfHypernets, base_adapter, soup
from training.config import TrainConfig
from training.data import DEFAULT_DATA, Batcher, load_split
from training.embeddings import task_embeddings

logger = logging.getLogger(__name__)


def _frozen(tensors: dict[str, torch.Tensor]) -> nn.ParameterDict:
    return nn.ParameterDict({m: nn.Parameter(x, requires_grad=False) for m, x in tensors.items()})


class BaseOnly(nn.Module):
    """The base adapter of a residual network (`base_adapter`) as a network: every task gets that adapter alone."""

    def __init__(self, net) -> None:
        super().__init__()
        lora = base_adapter(net)  # at the network's scaling, so it is scored at the members' strengths
        self.a, self.b = _frozen(lora.a), _frozen(lora.b)

    def forward(self, task_emb):
        n = task_emb.shape[0]
        return ({m: x.expand(n, -1, -1, -1) for m, x in self.a.items()},
                {m: x.expand(n, -1, -1, -1) for m, x in self.b.items()})


def candidates(members: list, names: list[str]) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"base adapter alone": BaseOnly(members[0])}
    out |= dict(zip(names, members, strict=True))
    if len(members) > 1:
        try:
            out["soup"] = soup(members)
        except ValueError as e:  # e.g. members from different initialisations: the mean of adapters still applies
            logger.warning("no soup: %s", e)
        out["mean of adapters"] = MeanOfHypernets(members)
    return out


def run(args: argparse.Namespace) -> dict:
    from training.hypernet_train import Validator, description_pool
    from training.runtime import load_frozen

    cfg = TrainConfig(base_model=args.base_model, data=args.data, device=args.device, dtype=args.dtype,
                      max_prompt_tokens=384)  # as the SFT jobs ran (training/jobs/common.sh)
    members = [load_checkpoint(p, None, cfg.device).eval() for p in args.members]
    names = [Path(p).name for p in args.members]
    held = [m.cfg.extra.get("val_tasks") for m in members]
    if not held[0] or any(h != held[0] for h in held):
        raise SystemExit("the members must be SFT runs with the same held-out tasks (val_tasks in hypernet.json)")
    val = [t for t in load_split("train", cfg.data or DEFAULT_DATA) if t.name in set(held[0])]
    emb = description_pool(task_embeddings(val, args.embeddings), [t.name for t in val], cfg.device, True)
    model, tok, _spec, injector = load_frozen(cfg, members[0].cfg.target_modules)
    batcher = Batcher(tok, cfg.max_prompt_tokens, cfg.max_answer_tokens)
    sets = {"sft": Validator(val, emb, batcher), "fresh": Validator([replace(t, train=t.test) for t in val], emb,
                                                                   batcher)}
    strengths = [float(s) for s in args.strengths.split(",")]
    scaling = members[0].cfg.alpha / members[0].cfg.rank
    result: dict = {"members": list(args.members), "heldout_tasks": [t.name for t in val], "strengths": strengths,
                    "items_per_set": {k: len(v.items) for k, v in sets.items()}, "candidates": {}}
    cands = candidates(members, names)
    for name, net in cands.items():
        row: dict = {}
        for set_name, validator in sets.items():
            items = {str(s): validator.losses(net.to(cfg.device), model, injector, s * scaling, cfg.device)
                     for s in strengths}
            row[set_name] = {s: round(sum(v) / len(v), 4) for s, v in items.items()}
            row[f"{set_name}_items"] = {s: [round(x, 4) for x in v] for s, v in items.items()}
        row["strength"] = min(row["sft"], key=row["sft"].get)  # chosen where SFT chooses: its own items
        row["fresh_at_strength"] = row["fresh"][row["strength"]]
        result["candidates"][name] = row
        logger.info("%s: sft %s, fresh %s", name, row["sft"], row["fresh"])
    base = result["candidates"]["base adapter alone"]
    for row in result["candidates"].values():
        mine, ref = row["fresh_items"][row["strength"]], base["fresh_items"][base["strength"]]
        row["fresh_items_above_base"] = sum(x > r for x, r in zip(mine, ref, strict=True))
    if args.save_soup and "soup" in cands:
        net, row = cands["soup"], result["candidates"]["soup"]
        net.cfg.extra |= {"val_tasks": held[0], "members": list(args.members), "strength": float(row["strength"]),
                          "val_loss_by_strength": row["sft"], "fresh_loss_by_strength": row["fresh"]}
        save_checkpoint(net.to("cpu"), args.save_soup)
        logger.info("soup written to %s", args.save_soup)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "average.json").write_text(json.dumps(result, indent=1))
    for name, row in result["candidates"].items():
        print(f"{name}: strength {row['strength']}, held-out loss sft {row['sft'][row['strength']]}, fresh "
              f"{row['fresh_at_strength']}, fresh items above the base adapter's {row['fresh_items_above_base']} of "
              f"{len(row['fresh_items'][row['strength']])}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--members", nargs="+", required=True, help="T2L checkpoints (SFT runs with the same held-out "
                   "tasks and base adapter)")
    p.add_argument("--base-model", required=True)
    p.add_argument("--embeddings", default=None, help="task embeddings file (hyperlora train embed-tasks); default: "
                   "embed with the encoder")
    p.add_argument("--data", default=None, help="SNI data dir (default ../shared/data/sni)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--strengths", default="0.5,0.75,1.0", help="adapter strengths to measure (comma-separated)")
    p.add_argument("--out", default=None, help="folder for average.json")
    p.add_argument("--save-soup", default=None, help="write the members' weight average here as a checkpoint")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    run(parser().parse_args())
