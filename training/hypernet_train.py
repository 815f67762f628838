"""`train hypernet`: Text-to-LoRA by reconstruction of the LoRA library, or end to end (SFT).

recon: regress every library adapter's A and B (L1, each module's factors normalised by the library's
       spread) from the embedding of one of its task's descriptions, sampled per step.
sft:   the generated adapters run inside the frozen base model on the train tasks' instances, a sampled
       description per task; the loss is the answer tokens' cross-entropy (the T2L SFT recipe).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from generator.apply import AdapterBank
from generator.hypernet.checkpoint import load_checkpoint, save_checkpoint
from generator.hypernet.config import HypernetConfig
from generator.hypernet.model import Hypernet, build_hypernet
from generator.peft_io import load_peft
from training.config import HypernetTrainConfig, TrainConfig
from training.data import DEFAULT_DATA, EXAMPLE_RATE, Batcher, Task, answer_loss, load_split, sample_pairs
from training.embeddings import task_embeddings
from training.loop import lora_step_loss, run_steps
from training.relabel import relabel_tasks

logger = logging.getLogger(__name__)


def sample_descriptions(emb: dict[str, torch.Tensor], names: list[str], rng: random.Random,
                        noise: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """One randomly chosen description embedding per task, `(len(names), dim)`, and which row of each task's
    pool it is. `noise`: std of Gaussian noise added to each (unit-norm) embedding."""
    rows, picks = [], []
    for n in names:
        e = emb[n]
        picks.append(rng.randrange(e.shape[0]))
        rows.append(e[picks[-1]])
    out = torch.stack(rows)
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)),
                                        ).to(out.device)
    return out, picks


def description_pool(emb: dict[str, torch.Tensor], names: list[str], device,
                     with_definition: bool = True) -> dict[str, torch.Tensor]:
    """Per task, its paraphrased descriptions and (by default) its definition: `(n_desc [+ 1], dim)`.

    Users (and most dev tasks) describe a task the way an SNI definition does, so the definition is one of
    the descriptions sampled in training.
    """
    out = {}
    for n in names:
        definition = f"{n}::definition"
        rows = [emb[n]] + ([emb[definition]] if with_definition and definition in emb else [])
        out[n] = torch.cat(rows).to(device)
    return out


def description_texts(task: Task, pool: torch.Tensor) -> list[str]:
    """The text of each row of `description_pool`'s entry for `task` (paraphrases first, definition last)."""
    texts = task.descriptions[: pool.shape[0]]
    return texts + [task.definition] * (pool.shape[0] - len(texts))


def sample_instructions(tasks: list[Task], picks: list[int], texts: dict[str, list[str]], rng: random.Random,
                        definition_rate: float) -> list[str]:
    """Each sample's prompt instruction: its task's definition with probability `definition_rate`, else the
    description its adapter is generated from (what a served adapter is prompted with)."""
    return [t.definition if rng.random() < definition_rate else texts[t.name][j] for t, j in zip(tasks, picks,
                                                                                                 strict=True)]


def nearest_tasks(emb: dict[str, torch.Tensor], names: list[str], k: int) -> dict[str, list[str]]:
    """Each task's `k` nearest other tasks by the cosine of their mean description embeddings."""
    means = torch.nn.functional.normalize(torch.stack([emb[n].float().mean(0) for n in names]), dim=-1)
    sim = means @ means.T
    sim.fill_diagonal_(-float("inf"))
    top = sim.topk(min(k, len(names) - 1), dim=-1).indices.tolist()
    return {n: [names[j] for j in row] for n, row in zip(names, top, strict=True)}


def mismatch(task_emb: torch.Tensor, names: list[str], emb: dict[str, torch.Tensor],
             neighbours: dict[str, list[str]], rate: float, rng: random.Random) -> tuple[torch.Tensor, int]:
    """Replace each row of `task_emb` (one per task in `names`), with probability `rate`, by a random description
    of a random one of that task's neighbours; returns the embeddings and how many rows were replaced."""
    if rate <= 0:
        return task_emb, 0
    out, swapped = task_emb.clone(), 0
    for k, n in enumerate(names):
        if neighbours.get(n) and rng.random() < rate:
            pool = emb[rng.choice(neighbours[n])]
            out[k] = pool[rng.randrange(pool.shape[0])].to(out.dtype)
            swapped += 1
    return out, swapped


def copy_pool(copies: list[Task], raw: dict[str, torch.Tensor], device, with_definition: bool) -> dict:
    """`description_pool` for relabelled copies; their embeddings come from the file when it has them (the GPU
    machine has no encoder: `python -m training.relabel` adds them), else from the encoder."""
    missing = [t for t in copies if t.name not in raw]
    raw = raw | (task_embeddings(missing, None) if missing else {})
    return description_pool(raw, [t.name for t in copies], device, with_definition)


def build_net(hcfg: HypernetTrainConfig, spec, embed_dim: int, init_from: str | None, device,
              seed: int = 0) -> Hypernet:
    if init_from:
        net = load_checkpoint(init_from, spec, device)
        net.train()
        return net
    torch.manual_seed(seed)
    base = load_peft(hcfg.base_adapter, spec) if hcfg.base_adapter else None
    base_rank = base.rank if base is not None else 0
    rank = hcfg.rank + base_rank  # a residual network's adapters hold the base's ranks, then the generated ones
    cfg = HypernetConfig(spec=spec, variant=hcfg.variant, target_modules=hcfg.target_modules, rank=rank,
                         alpha=hcfg.alpha * rank / hcfg.rank, embed_dim=embed_dim, hidden_dim=hcfg.hidden_dim,
                         n_blocks=hcfg.n_blocks, dropout=hcfg.dropout, base_rank=base_rank)
    net = build_hypernet(cfg)
    if base is not None:
        if tuple(base.target_modules) != tuple(cfg.target_modules):
            raise ValueError(f"base adapter {hcfg.base_adapter} targets {list(base.target_modules)}, the "
                             f"hypernetwork {list(cfg.target_modules)}")
        net.set_base(base.a, base.b, base.alpha / base.rank)
    return net.to(device).train()


def _library_targets(library: Path, names: list[str], spec, device) -> tuple[list[str], dict, dict]:
    """Stacked library factors of the tasks present: A {m: (n, L, r, d_in)}, B {m: (n, L, d_out, r)}."""
    present = [n for n in names if (library / n / "adapter_model.safetensors").is_file()]
    if not present:
        raise FileNotFoundError(f"no trained LoRA in {library} for any train task: run `hyperlora train lora-library`")
    adapters = [load_peft(library / n, spec) for n in present]
    a = {m: torch.stack([ad.a[m] for ad in adapters]).to(device) for m in adapters[0].target_modules}
    b = {m: torch.stack([ad.b[m] for ad in adapters]).to(device) for m in adapters[0].target_modules}
    return present, a, b


def snapshot_dir(out_dir: str | Path, step: int) -> Path:
    """Where `snapshot_steps` saves the network after `step`: beside the checkpoint, in `snapshots/`."""
    out = Path(out_dir)
    return out.parent / "snapshots" / f"{out.name}-step{step}"


def split_val(tasks: list[Task], n_val: int) -> tuple[list[Task], list[Task]]:
    """Hold out `n_val` train tasks for validation: every second one of the last `2 * n_val`, so the first
    tasks (eval's train sample) stay trained on. Deterministic."""
    if n_val == 0:
        return tasks, []
    if 2 * n_val >= len(tasks):
        raise ValueError(f"val_tasks={n_val} leaves too few of the {len(tasks)} train tasks to train on")
    held = {t.name for t in tasks[-2 * n_val:][1::2]}
    return [t for t in tasks if t.name not in held], [t for t in tasks if t.name in held]


RELABELLED_STRENGTHS = (0.0, 0.75, 1.0)  # where the loss on relabelled copies of held-out tasks is recorded


class Validator:
    """Answer loss of held-out tasks' adapters, generated from each task's first description and its
    definition, on a fixed sample of their instances: what early stopping watches."""

    def __init__(self, val: list[Task], emb: dict[str, torch.Tensor], batcher: Batcher, per_task: int = 16) -> None:
        rng = random.Random(1)
        self.items = []  # (embedding (1, dim), batch) per (task, description)
        for t in val:
            pairs = sample_pairs(batcher.tok, [t], per_task, rng)
            pool = emb[t.name]
            for row in {0, pool.shape[0] - 1}:  # first paraphrase and, last in the pool, the definition
                self.items.append((pool[row: row + 1], pairs))
        self.batcher = batcher

    @torch.no_grad()
    def losses(self, net: Hypernet, model, injector, scaling: float, device) -> list[float]:
        """Answer loss of each held-out (task, description) item, task-major; `scaling` 0 is the base model."""
        was_training = net.training
        net.eval()
        out = []
        for e, pairs in self.items:
            a, b = net(e)
            bank = AdapterBank.from_factors(a, b, scaling)
            with injector.use(bank.gather(torch.zeros(len(pairs), dtype=torch.long, device=device))):
                out.append(answer_loss(model, self.batcher.batch(pairs, device)).item())
        net.train(was_training)
        return out

    def loss(self, net: Hypernet, model, injector, scaling: float, device) -> float:
        """Mean answer loss over the held-out (task, description) items; `scaling` 0 is the base model."""
        items = self.losses(net, model, injector, scaling, device)
        return sum(items) / len(items)

    def by_strength(self, net: Hypernet, model, injector, scaling: float, device,
                    strengths: tuple[float, ...]) -> dict[str, float]:
        """`loss` at each adapter strength (a multiple of `scaling`; 0 is the base model), as the record keeps it."""
        return {str(k): round(self.loss(net, model, injector, k * scaling, device), 4) for k in strengths}


def train_hypernet(cfg: TrainConfig, hcfg: HypernetTrainConfig, out_dir: str | Path, embeddings: str | None = None,
                   library: str | None = None, init_from: str | None = None, rank: int = 0, world: int = 1,
                   wrap: Callable[[Hypernet], torch.nn.Module] | None = None) -> Path | None:
    """Train and save a checkpoint into `out_dir`; returns its path.

    Data-parallel (training.distributed): every worker calls this with its `rank` and a `wrap` that makes the
    network's gradients sync (DDP). Each worker samples its own tasks, so a step sees workers x tasks_per_step
    tasks; only rank 0 validates and writes (the others return None).
    """
    tasks = load_split("train", cfg.data or DEFAULT_DATA, cfg.limit_tasks)
    raw = task_embeddings(tasks, embeddings)
    with_definition = hcfg.description_pool == "descriptions+definition"
    emb = description_pool(raw, [t.name for t in tasks], cfg.device, with_definition)
    embed_dim = next(iter(emb.values())).shape[1]
    rng = random.Random(cfg.seed + rank)
    init_seed = cfg.seed if hcfg.init_seed is None else hcfg.init_seed
    validator, copies, held_copies = None, [], []
    if hcfg.mode == "recon":
        from generator.config import load_spec

        spec = load_spec(cfg.base_model)
        names, ta, tb = _library_targets(Path(library or "runs/lora-library"), [t.name for t in tasks], spec,
                                         cfg.device)
        net = build_net(hcfg, spec, embed_dim, init_from, cfg.device, init_seed)
        std = {**{("A", m): t.std() for m, t in ta.items()}, **{("B", m): t.std() for m, t in tb.items()}}

        def loss_fn(step):
            idx = rng.sample(range(len(names)), min(hcfg.tasks_per_step, len(names)))
            a, b = net(sample_descriptions(emb, [names[i] for i in idx], rng, hcfg.embed_noise)[0])
            terms = [((a[m] - ta[m][idx]).abs().mean() / std[("A", m)]) for m in a]
            terms += [((b[m] - tb[m][idx]).abs().mean() / std[("B", m)]) for m in b]
            return torch.stack(terms).mean()
    else:
        from training.runtime import load_frozen

        model, tok, spec, injector = load_frozen(cfg, hcfg.target_modules)
        batcher = Batcher(tok, cfg.max_prompt_tokens, cfg.max_answer_tokens)
        net = build_net(hcfg, spec, embed_dim, init_from, cfg.device, init_seed)
        fwd = wrap(net) if wrap is not None else net  # gradients sync through the wrapper's forward
        tasks, val = split_val(tasks, hcfg.val_tasks)
        copies = relabel_tasks(tasks, hcfg.relabel_copies) if hcfg.relabel_copies else []  # never a held-out task's
        if copies:
            emb |= copy_pool(copies, raw, cfg.device, with_definition)
            logger.info("training on %d relabelled copies of %d tasks too", len(copies), len(tasks))
            tasks = tasks + copies
        names = [t.name for t in tasks]
        scaling = net.cfg.alpha / net.cfg.rank
        validator = Validator(val, emb, batcher) if val and rank == 0 else None
        # with copies: also watch relabelled copies of the held-out tasks, whose answer words only the instruction
        # gives (a record of what the copies are for; the plain held-out loss still picks the step)
        held_copies = relabel_tasks(val, 1) if copies and validator is not None else []
        if held_copies:
            emb |= copy_pool(held_copies, raw, cfg.device, with_definition)
            relabelled = Validator(held_copies, emb, batcher)

        texts = {t.name: description_texts(t, emb[t.name]) for t in tasks}
        # neighbours among the tasks trained on only: a held-out task's descriptions never reach training
        neighbours = nearest_tasks(emb, names, hcfg.mismatch_neighbours) if hcfg.mismatch_rate > 0 else {}

        def loss_fn(step):
            idx = rng.sample(range(len(tasks)), min(hcfg.tasks_per_step, len(tasks)))
            chosen = [names[i] for i in idx]
            task_emb, picks = sample_descriptions(emb, chosen, rng, hcfg.embed_noise)
            instructions = sample_instructions([tasks[i] for i in idx], picks, texts, rng, hcfg.definition_rate)
            task_emb, _ = mismatch(task_emb, chosen, emb, neighbours, hcfg.mismatch_rate, rng)

            def factors(_ids):
                return fwd(task_emb)

            return lora_step_loss(model, injector, batcher, tasks, idx, factors, scaling, hcfg.per_task, rng,
                                  cfg.device, instructions, hcfg.example_rate)

    params = [p for p in net.parameters() if p.requires_grad]
    averager = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(hcfg.ema)) if hcfg.ema else None
    kept = averager.module if averager is not None else net  # what is validated and saved
    extra = {"mode": hcfg.mode, "steps": hcfg.steps, "train_tasks": len(tasks), "init_from": bool(init_from),
             "workers": world, **({"base_adapter": str(hcfg.base_adapter)} if hcfg.base_adapter else {}),
             **({"ema": hcfg.ema} if hcfg.ema else {}),
             **({"mismatch_rate": hcfg.mismatch_rate, "mismatch_neighbours": hcfg.mismatch_neighbours}
                if hcfg.mismatch_rate else {}),
             **({"example_rate": hcfg.example_rate} if hcfg.example_rate != EXAMPLE_RATE else {}),
             **({"seed": cfg.seed} if cfg.seed else {}),
             **({"init_seed": hcfg.init_seed} if hcfg.init_seed is not None else {}),
             **({"relabel_copies": hcfg.relabel_copies, "relabelled_tasks": [t.name for t in copies]}
                if hcfg.relabel_copies else {})}
    if validator is not None:
        extra |= {"val_tasks": [t.name for t in val], "val_curve": [], "best_val_loss": float("inf"),
                  **({"val_relabelled_curve": []} if held_copies else {})}

    def on_step(step: int, _loss: float) -> None:
        done = step + 1
        if averager is not None and step >= 0:
            averager.update_parameters(net)
        if rank == 0 and done in hcfg.snapshot_steps:
            kept.cfg.extra = dict(extra, snapshot_step=done)
            save_checkpoint(kept, snapshot_dir(out_dir, done))
        if validator is None or (step >= 0 and done % hcfg.eval_every and done != hcfg.steps):
            return
        v = validator.loss(kept, model, injector, scaling, cfg.device)
        extra["val_curve"].append([done, round(v, 4)])
        if held_copies:
            extra["val_relabelled_curve"].append([done, round(relabelled.loss(kept, model, injector, scaling,
                                                                             cfg.device), 4)])
        logger.info("step %d: validation loss %.4f on %d held-out tasks", done, v, len(val))
        if v < extra["best_val_loss"]:  # keep the best step on disk, so a killed run leaves it behind
            extra.update(best_val_loss=v, best_step=done)
            kept.cfg.extra = dict(extra)
            save_checkpoint(kept, out_dir)

    if validator is not None:
        on_step(-1, 0.0)  # step 0 is a candidate too: a residual network starts at its base adapter
    losses = run_steps(params, hcfg.steps, hcfg.lr, loss_fn, f"hypernet-{hcfg.mode}", warmup=hcfg.warmup,
                       weight_decay=hcfg.weight_decay, on_step=on_step)
    if rank != 0:
        return None
    extra["final_loss"] = sum(losses[-20:]) / len(losses[-20:])
    if validator is not None:  # the best step's checkpoint is already written; record the whole run in it
        best = load_checkpoint(out_dir, spec, cfg.device)
        # the held-out loss at other adapter strengths (0: the base model with the same prompts), for the record
        # and for choosing a strength by held-out train tasks
        extra["val_loss_by_strength"] = validator.by_strength(best, model, injector, scaling, cfg.device,
                                                              (0.0, 0.5, 0.75, 1.0))
        logger.info("held-out loss by adapter strength: %s", extra["val_loss_by_strength"])
        if held_copies:
            extra["val_relabelled_by_strength"] = relabelled.by_strength(best, model, injector, scaling, cfg.device,
                                                                         RELABELLED_STRENGTHS)
            logger.info("relabelled held-out loss by adapter strength: %s", extra["val_relabelled_by_strength"])
        best = best.to("cpu")
        best.cfg.extra = extra
        return save_checkpoint(best, out_dir)
    kept.cfg.extra = extra
    kept.eval()
    return save_checkpoint(kept, out_dir)
