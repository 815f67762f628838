"""The full offline pipeline in stages, runnable without the CLI's extras (the GPU machine has no typer):

    python -m training.pipeline --stages library,multitask,recon,sft,predict --work DIR --device cuda ...

Every stage skips what its outputs already hold, so a later call continues where an earlier one stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from training.config import HypernetTrainConfig, LoraTrainConfig, TrainConfig

STAGES = ("library", "dev-library", "multitask", "recon", "sft", "predict")


def run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(base_model=args.base_model, data=args.data, device=args.device, dtype=args.dtype,
                      limit_tasks=args.limit_tasks, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
    emb = args.embeddings
    timings = {}
    for stage in args.stages.split(","):
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        t0 = time.perf_counter()
        if stage == "library":
            from training.lora_library import train_lora_library

            train_lora_library(cfg, LoraTrainConfig(steps=args.library_steps, per_task=args.library_per_task,
                                                    tasks_per_batch=args.tasks_per_batch, lr=args.library_lr),
                               work / "lora-library", only=args.library_only.split(",") if args.library_only else None)
        elif stage == "dev-library":  # each dev task's own LoRA (never seen by the generators): `eval strategy`
            from training.lora_library import train_lora_library

            train_lora_library(cfg, LoraTrainConfig(steps=args.library_steps, per_task=args.library_per_task,
                                                    tasks_per_batch=args.tasks_per_batch, lr=args.library_lr),
                               work / "dev-library", split="dev")
        elif stage == "multitask" and not (work / args.multitask_out / "meta.json").exists():
            from training.lora_library import train_multitask

            train_multitask(cfg, LoraTrainConfig(steps=args.multitask_steps, per_task=args.multitask_batch,
                                                 lr=args.multitask_lr or args.library_lr), work / args.multitask_out,
                            holdout=args.multitask_holdout)
        elif stage in ("recon", "sft") and not (work / _hypernet_dir(stage, args) / "hypernet.json").exists():
            from training.hypernet_train import train_hypernet

            steps = args.recon_steps if stage == "recon" else args.sft_steps
            lr = args.recon_lr if stage == "recon" else args.hypernet_lr
            hcfg = HypernetTrainConfig(mode=stage, variant=args.variant, steps=steps, lr=lr,
                                       tasks_per_step=args.tasks_per_step, per_task=args.sft_per_task,
                                       description_pool=args.sft_pool, dropout=args.dropout,
                                       embed_noise=args.embed_noise, weight_decay=args.weight_decay,
                                       val_tasks=args.val_tasks if stage == "sft" else 0, eval_every=args.eval_every,
                                       base_adapter=args.base_adapter if stage == "sft" else None, ema=args.ema,
                                       mismatch_rate=args.mismatch_rate,
                                       mismatch_neighbours=args.mismatch_neighbours, example_rate=args.example_rate,
                                       relabel_copies=args.relabel_copies, init_seed=args.init_seed,
                                       snapshot_steps=tuple(int(x) for x in args.snapshot_steps.split(",") if x))
            init = str(work / "t2l-recon") if stage == "sft" and args.sft_init_from_recon else None
            train_hypernet(cfg, hcfg, work / _hypernet_dir(stage, args), embeddings=emb,
                           library=str(work / "lora-library"), init_from=init)
        elif stage == "predict":
            from training.evaluate import EvalConfig, predict

            hypernets = {d.name: str(d) for d in sorted(work.glob("t2l-*")) if (d / "hypernet.json").exists()}
            gens = dict(g.split("=", 1) for g in args.generator) if args.generator else {}
            only = set(args.predict_only.split(",")) if args.predict_only else None
            if only is not None:  # just these generators' rows (and --lora-row's), merged into --merge-into
                hypernets = {k: v for k, v in hypernets.items() if k in only}
                gens = {k: v for k, v in gens.items() if k in only}
            ecfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch,
                              max_per_task=args.max_per_task, train_sample=args.train_sample, hypernets=hypernets,
                              generators=gens,
                              multitask=str(work / "multitask") if (work / "multitask").is_dir() else None,
                              loras=dict(g.split("=", 1) for g in args.lora_row or []),
                              library=str(work / "lora-library"), baselines=only is None,
                              example_strength=not args.no_example_strength,
                              methods=frozenset(args.predict_methods.split(",")) if args.predict_methods else None)
            predict(cfg, ecfg, work / "predictions.json", embeddings=emb, merge_into=args.merge_into,
                    command="python -m training.pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        timings[stage] = round(time.perf_counter() - t0, 1)
        print(f"stage {stage}: {timings[stage]} s", flush=True)
    (work / f"timings-{int(time.time())}.json").write_text(json.dumps(timings))


def _hypernet_dir(stage: str, args: argparse.Namespace) -> str:
    return args.sft_out if stage == "sft" else "t2l-recon"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--work", required=True, help="directory for every stage's outputs")
    p.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--data", default=None, help="SNI data dir (default ../shared/data/sni)")
    p.add_argument("--embeddings", default=None, help="task embeddings file (hyperlora train embed-tasks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--limit-tasks", type=int, default=None)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--library-steps", type=int, default=100)
    p.add_argument("--library-per-task", type=int, default=4)
    p.add_argument("--library-lr", type=float, default=1e-3)
    p.add_argument("--library-only", default=None, help="library: only these train tasks (comma-separated names)")
    p.add_argument("--tasks-per-batch", type=int, default=146)
    p.add_argument("--multitask-steps", type=int, default=300)
    p.add_argument("--multitask-batch", type=int, default=64)
    p.add_argument("--multitask-lr", type=float, default=None, help="default: --library-lr")
    p.add_argument("--multitask-out", default="multitask", help="multi-task LoRA folder under --work")
    p.add_argument("--multitask-holdout", type=int, default=0, help="leave out the train tasks that SFT with "
                   "--val-tasks N holds out (same N), so a residual hypernetwork on it is validated on unseen tasks")
    p.add_argument("--base-adapter", default=None, help="SFT: a LoRA dir every generated adapter contains as fixed "
                   "leading ranks (the network learns a residual on it), e.g. WORK/multitask-holdout")
    p.add_argument("--variant", default="M", choices=["L", "M", "S"])
    p.add_argument("--recon-steps", type=int, default=3000)
    p.add_argument("--sft-steps", type=int, default=1000)
    p.add_argument("--sft-init-from-recon", action="store_true")
    p.add_argument("--sft-pool", default="descriptions+definition", choices=["descriptions", "descriptions+definition"],
                   help="what a task's sampled description is drawn from")
    p.add_argument("--hypernet-lr", type=float, default=2e-4, help="SFT learning rate")
    p.add_argument("--recon-lr", type=float, default=1e-3)
    p.add_argument("--sft-out", default="t2l-sft", help="SFT checkpoint folder under --work (must start with t2l-: "
                   "predict evaluates every t2l-* folder)")
    p.add_argument("--dropout", type=float, default=0.05, help="hypernetwork dropout")
    p.add_argument("--embed-noise", type=float, default=0.0, help="std of noise on sampled description embeddings")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="hypernetwork AdamW weight decay")
    p.add_argument("--val-tasks", type=int, default=0, help="SFT: train tasks held out to pick the best step")
    p.add_argument("--eval-every", type=int, default=100, help="SFT: steps between validation losses")
    p.add_argument("--ema", type=float, default=0.0, help="decay of a moving average of the hypernetwork's weights, "
                   "validated and saved instead of the last step's (0: off)")
    p.add_argument("--snapshot-steps", default="", help="also save the network after these steps (comma-separated) "
                   "into WORK/snapshots/NAME-stepN")
    p.add_argument("--mismatch-rate", type=float, default=0.0, help="SFT: share of a step's tasks whose adapter is "
                   "generated from a nearby other train task's description (the prompt stays the task's own), so "
                   "adapters learn to follow the prompt as an unseen task needs")
    p.add_argument("--mismatch-neighbours", type=int, default=HypernetTrainConfig.mismatch_neighbours,
                   help="SFT: nearest tasks a mismatch draws from")
    p.add_argument("--example-rate", type=float, default=HypernetTrainConfig.example_rate,
                   help="SFT: share of samples with 1-2 positive examples as earlier chat turns")
    p.add_argument("--relabel-copies", type=int, default=0, help="SFT: also train on up to this many relabelled copies "
                   "of each qualifying classification task, whose answer words only the instruction gives "
                   "(training.relabel; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training jobs' sampling and initialisation (0: "
                   "the shipped runs'); another seed of the same recipe shows how much of a result is the draw")
    p.add_argument("--init-seed", type=int, default=None, help="seed of the network's initialisation alone (default: "
                   "--seed); runs with one --init-seed and several --seed values can be averaged (generator.hypernet"
                   ".soup)")
    p.add_argument("--tasks-per-step", type=int, default=32)
    p.add_argument("--sft-per-task", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--max-per-task", type=int, default=None)
    p.add_argument("--train-sample", type=int, default=16)
    p.add_argument("--generator", action="append", help="extra eval row NAME=KIND:CHECKPOINT (e.g. cvae=cvae:DIR)")
    p.add_argument("--lora-row", action="append", help="extra eval rows NAME=PEFT_DIR: a fixed LoRA with the "
                   "instruction (and with 2 examples), like the multi-task LoRA")
    p.add_argument("--predict-only", default=None, help="predict: only these t2l-*/--generator names' rows (and "
                   "--lora-row's); no baselines")
    p.add_argument("--no-example-strength", action="store_true", help="predict: leave out the T2L rows whose "
                   "strength is chosen from each prompt's examples (x[examples])")
    p.add_argument("--predict-methods", default=None, help="predict: only the rows of these methods (exact names, "
                   "comma-separated), e.g. to rerun one row on another device into its own file")
    p.add_argument("--merge-into", default=None, help="predict: keep an earlier predictions file's records and add "
                   "only the methods it lacks")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(parser().parse_args())
