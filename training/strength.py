"""How strong a generated adapter should be when the prompt already holds examples: chosen on held-out train
tasks, then measured on dev.

With two in-context examples in the prompt, a generated adapter at full strength can pull answers away from
what the examples show. This job (1) measures the answer loss of the shipped T2L adapters on the tasks SFT held
out (never dev), with the instruction and 2 examples in the prompt, at several strengths (the adapter's B scaled;
0 is the base model), and (2) generates dev answers for "T2L + instruction + 2 examples" at each strength, so
the quality table shows what a strength below 1 would cost or save. Runs where the base model is (the GPU):

    python -m training.strength --checkpoint DIR --base-model DIR --embeddings emb.safetensors --device cuda --out W

Without examples the same choice needs no model: SFT already measured the held-out loss at several strengths
(`val_loss_by_strength`), and `--plain` records the best one as the checkpoint's `strength`, the strength every
generated adapter is made at:

    python -m training.strength --checkpoint DIR --plain
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from generator.apply import AdapterBank
from generator.hypernet.checkpoint import load_checkpoint
from generator.lora import LoraAdapter
from generator.scoring import STRENGTHS
from training.config import TrainConfig
from training.data import DEFAULT_DATA, Batcher, answer_loss, load_split
from training.embeddings import task_embeddings
from training.evaluate import PROMPTS, EvalConfig, generated_adapters, make_row, run_rows

logger = logging.getLogger(__name__)


@torch.no_grad()
def heldout_icl_loss(net, model, tok, injector, tasks, emb, strengths, device, per_task: int = 16) -> dict:
    """Held-out answer loss with the instruction and 2 examples in the prompt, per strength and per (task,
    adapter from its first paraphrase / definition) item: {"mean": {s: loss}, "items": [{s: loss}, ...]}."""
    batcher = Batcher(tok, 1024, 64)
    build = PROMPTS["icl"][0]
    items: list[dict[str, float]] = []
    for t in tasks:
        pairs = [(build(tok, t, e.input), e.outputs[0]) for e in t.train[:per_task]]
        batch = batcher.batch(pairs, device)
        for e in (emb[t.name][:1], emb[f"{t.name}::definition"][:1]):
            a, b = net(e.to(device))
            row = {}
            for s in strengths:
                bank = AdapterBank.from_factors(a, b, s * net.cfg.alpha / net.cfg.rank)
                with injector.use(bank.gather(torch.zeros(len(pairs), dtype=torch.long, device=device))):
                    row[str(s)] = answer_loss(model, batch).item()
            items.append(row)
    mean = {str(s): round(sum(r[str(s)] for r in items) / len(items), 4) for s in strengths}
    for s in strengths:
        logger.info("strength %.2f: held-out loss with 2 examples %.4f", s, mean[str(s)])
    return {"mean": mean, "items": items}


def adapter_from(net, spec, e: torch.Tensor, strength: float = 1.0) -> LoraAdapter:
    """The adapter the hypernetwork `net` makes from one task embedding `e` `(1, dim)`, at `strength`."""
    a, b = net(e)
    return LoraAdapter(spec.name, net.cfg.rank, net.cfg.alpha * strength, {m: x[0] for m, x in a.items()},
                       {m: x[0] for m, x in b.items()})


@torch.no_grad()
def example_rule_loss(net, model, tok, injector, spec, tasks, emb, items: list[dict[str, float]], strengths,
                      device) -> dict:
    """The request-time rule (generator.scoring.strength_from_examples: each adapter at the strength that best
    predicts the prompt's own 2 examples from each other) on the same held-out items: its mean loss and the
    strengths it chose, beside each fixed strength's."""
    from generator.scoring import strength_from_examples

    chosen = []
    for t in tasks:
        examples = [(e.input, e.outputs[0]) for e in t.positive_examples[:2]]
        for e in (emb[t.name][:1], emb[f"{t.name}::definition"][:1]):
            adapter = adapter_from(net, spec, e.to(device))
            chosen.append(strength_from_examples(model, tok, injector, spec, adapter, t.definition, examples,
                                                 strengths, device)[0] if len(examples) >= 2 else None)
    losses = [r[str(s if s is not None else max(strengths))] for r, s in zip(items, chosen, strict=True)]
    return {"loss": round(sum(losses) / len(losses), 4), "chosen": chosen}


def _checkpoint_extra(checkpoint: str | Path) -> tuple[Path, dict]:
    """The checkpoint's hypernet.json path and its contents (with an `extra` dict)."""
    path = Path(checkpoint) / "hypernet.json"
    meta = json.loads(path.read_text())
    meta.setdefault("extra", {})
    return path, meta


def _write_extra(path: Path, meta: dict, **fields) -> None:
    from retriever.fsutil import write_json_atomic

    meta["extra"].update(fields)
    write_json_atomic(path, meta)


def record_strength(checkpoint: str | Path, chosen: float, loss: dict) -> None:
    """Write the chosen strength and the loss table into the checkpoint's hypernet.json (atomically)."""
    path, meta = _checkpoint_extra(checkpoint)
    _write_extra(path, meta, strength_with_examples=chosen, heldout_icl_loss_by_strength=loss)


def record_plain_strength(checkpoint: str | Path) -> float:
    """Choose the strength without in-context examples, `strength`, as the one with the lowest held-out
    train-task answer loss that SFT recorded for its best step (`val_loss_by_strength`, the instruction in the
    prompt), and write it into the checkpoint's hypernet.json (atomically). Generated adapters are made at it."""
    path, meta = _checkpoint_extra(checkpoint)
    loss = {float(k): v for k, v in (meta["extra"].get("val_loss_by_strength") or {}).items() if float(k) > 0}
    if not loss:
        raise SystemExit(f"{path} records no held-out loss by strength (val_loss_by_strength): train it with "
                         "--val-tasks so SFT measures one")
    chosen = min(loss, key=loss.get)
    _write_extra(path, meta, strength=chosen)
    logger.info("held-out loss by strength %s: strength without examples %g", loss, chosen)
    return chosen


def relabelled_loss(args: argparse.Namespace) -> dict:
    """The answer loss on relabelled copies of the checkpoint's held-out tasks (training.relabel: answer words that
    only the instruction gives), at strengths 0, 0.75 and 1, measured as SFT with `--relabel-copies` records it
    (`val_relabelled_by_strength`): does an adapter for an unseen task follow the instruction's answer words?"""
    from training.hypernet_train import RELABELLED_STRENGTHS, Validator, copy_pool
    from training.relabel import relabel_tasks
    from training.runtime import load_frozen

    cfg = TrainConfig(base_model=args.base_model, data=args.data, device=args.device, dtype=args.dtype,
                      max_prompt_tokens=384)  # as the SFT jobs ran (training/jobs/common.sh)
    net = load_checkpoint(args.checkpoint, None, cfg.device).eval()
    held = set(net.cfg.extra.get("val_tasks") or [])
    copies = relabel_tasks([t for t in load_split("train", cfg.data or DEFAULT_DATA) if t.name in held], 1)
    if not copies:
        raise SystemExit(f"{args.checkpoint}: none of its held-out tasks has a relabelled copy")
    emb = copy_pool(copies, task_embeddings([], args.embeddings) if args.embeddings else {}, cfg.device, True)
    model, tok, _spec, injector = load_frozen(cfg, net.cfg.target_modules)
    validator = Validator(copies, emb, Batcher(tok, cfg.max_prompt_tokens, cfg.max_answer_tokens))
    loss = validator.by_strength(net, model, injector, net.cfg.alpha / net.cfg.rank, cfg.device, RELABELLED_STRENGTHS)
    logger.info("relabelled held-out loss by adapter strength (%d copies): %s", len(copies), loss)
    result = {"relabelled_tasks": [t.name for t in copies], "relabelled_loss_by_strength": loss}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "relabelled.json").write_text(json.dumps(result, indent=1))
    return result


def run(args: argparse.Namespace) -> dict:
    from training.runtime import load_frozen

    if args.plain:
        return {"strength": record_plain_strength(args.checkpoint)}
    if args.relabelled:
        return relabelled_loss(args)
    if not args.out:
        raise SystemExit("--out is required (the folder for strength.json)")
    cfg = TrainConfig(base_model=args.base_model, data=args.data, device=args.device, dtype=args.dtype)
    data = cfg.data or DEFAULT_DATA
    net = load_checkpoint(args.checkpoint, None, cfg.device).eval()
    held = set(net.cfg.extra.get("val_tasks") or [])
    train = [t for t in load_split("train", data) if t.name in held]
    dev = load_split("dev", data)
    emb = task_embeddings(train + dev, args.embeddings)
    model, tok, spec, injector = load_frozen(cfg, net.cfg.target_modules)
    strengths = [float(s) for s in args.strengths.split(",")]
    held_out = heldout_icl_loss(net, model, tok, injector, train, emb, strengths, cfg.device)
    loss = held_out["mean"]
    chosen = float(min(loss, key=loss.get))
    rule = example_rule_loss(net, model, tok, injector, spec, train, emb, held_out["items"], strengths, cfg.device)
    logger.info("strength chosen from each prompt's examples: held-out loss %.4f (fixed %g: %.4f)", rule["loss"],
                chosen, loss[str(chosen)])
    if args.record:  # generated adapters carry it (generator/generate.py); predict adds its dev row
        record_strength(args.checkpoint, chosen, loss)
        if net.cfg.extra.get("val_loss_by_strength"):  # and the strength without examples, from SFT's record
            record_plain_strength(args.checkpoint)
    result = {"heldout_tasks": sorted(held), "heldout_icl_loss_by_strength": loss, "chosen_strength": chosen,
              "example_rule": rule, "records": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.rows:
        (out / "strength.json").write_text(json.dumps(result, indent=1))
        logger.info("chosen strength with examples (lowest held-out loss): %g", chosen)
        return result
    ads = generated_adapters(f"t2l:{args.checkpoint}", spec, torch.stack([emb[t.name][0] for t in dev]), cfg.device)
    rows = []
    for s in strengths:
        if s in (0.0, 1.0):  # the base model's and the full adapter's rows are in the main table already
            continue
        scaled = [replace(a, alpha=a.alpha * s) for a in ads]
        rows += [make_row(f"{args.name} x{s:g} + instruction + 2 examples", "dev", t, tok, "icl", a, None)
                 for t, a in zip(dev, scaled, strict=True)]
    result["records"] = run_rows(rows, model, tok, injector, spec, EvalConfig(batch_size=args.eval_batch),
                                 cfg.device)
    (out / "strength.json").write_text(json.dumps(result, indent=1))
    logger.info("chosen strength with examples (lowest held-out loss): %g", chosen)
    return result


def checkpoint_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options of a job that scores a T2L checkpoint on its held-out train tasks (this one, example_gate)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="T2L checkpoint (its extra.val_tasks are the held-out tasks)")
    p.add_argument("--name", default=name, help="the checkpoint's row name (prefix) in the predictions")
    p.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--data", default=None)
    p.add_argument("--embeddings", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p


def parser() -> argparse.ArgumentParser:
    p = checkpoint_parser(__doc__, "t2l-sft-m")
    p.add_argument("--strengths", default=",".join(str(s) for s in STRENGTHS))
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--out", help="folder for strength.json (required unless --plain)")
    p.add_argument("--plain", action="store_true", help="only choose the strength without examples from the "
                   "held-out loss SFT recorded (val_loss_by_strength) and write it into the checkpoint; no model "
                   "is loaded")
    p.add_argument("--record", action="store_true", help="write the chosen strength into the checkpoint (and, when "
                   "SFT recorded its held-out loss by strength, the strength without examples, as --plain does)")
    p.add_argument("--relabelled", action="store_true", help="only measure the held-out loss on relabelled copies "
                   "of the held-out tasks (training.relabel) at strengths 0, 0.75 and 1, as SFT with "
                   "--relabel-copies records it; writes OUT/relabelled.json when --out is given")
    p.add_argument("--rows", action="store_true", help="also generate dev answers at each strength (the quality "
                   "table's predict adds the recorded strength's row by itself)")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(parser().parse_args())
