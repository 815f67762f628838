"""Training the `cvae` (ICM-LoRA) and `sg` (SG-LoRA) generators on the LoRA library.

Both fit the same CVAE over normalised LoRA rows (see generator.cvae.model); the loss of a batch of
library snapshots, each with one sampled description of its task (and, when known, its examples), is

    recon(decode(z ~ q(z|x,c), c), x) + beta * KL(q(z|x,c) || prior) + prior_weight * recon(decode(mu_prior, c), x)

cvae: the prior is N(0, I). sg: the prior is the semantic prior of the task's description over the OTHER
library tasks (leave-one-out, so training sees what zero-shot generation sees), from expert latent stats
refreshed every `refresh_every` steps with the current encoder. The last term (ours, not the papers') trains
exactly what generation does: decoding the prior mean. Runs without typer:

    python -m training.cvae --kind sg --library runs/lora-library --embeddings emb.safetensors --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from generator.cvae.checkpoint import checkpoint_nbytes, save_cvae
from generator.cvae.config import SIZES, CVAEConfig, Size
from generator.cvae.model import LoraCVAE
from generator.cvae.prior import ExpertBank, expert_stats, gaussian_kl
from generator.library_data import library_nbytes
from generator.models import DEFAULT_EMBEDDER
from training.cvae_data import LibraryTensors, check_layout, load_library_tensors

logger = logging.getLogger(__name__)
TINY_STEPS = 20  # default step count of a --tiny run


@dataclass
class CVAETrainConfig:
    """Training the `cvae` generator (and, with SGTrainConfig's extra fields, the `sg` one)."""

    library: str = "runs/lora-library"  # LoRA library root (`hyperlora train lora-library`)
    out: str = "runs/cvae"  # checkpoint directory
    embeddings: str | None = None  # safetensors of task embeddings ("{task}", "{task}::examples"); missing: computed
    embedder: str = DEFAULT_EMBEDDER  # used only for embeddings missing from `embeddings`
    data: str | None = None  # SNI data dir: its positive examples become the in-context condition; None: none
    n_examples: int = 2  # examples per task in the in-context condition
    size: Size = "default"  # CVAE widths (generator.cvae.config.SIZES)
    steps: int = 4000
    batch_size: int = 64  # library snapshots per step
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 100  # linear lr warm-up steps, then cosine decay
    beta: float = 1e-3  # KL weight (recon is a per-element mean, KL a sum over latent dims)
    kl_warmup: int = 500  # steps over which beta ramps up from 0
    prior_weight: float = 0.5  # weight of reconstructing from the prior mean
    cond_dropout: float = 0.1  # probability of dropping a sample's whole condition (forces z to carry the task)
    example_dropout: float = 0.5  # probability of hiding a sample's examples (so both condition forms work)
    device: str = "cpu"
    seed: int = 0
    save_every: int = 1000  # steps between intermediate checkpoints (0: only at the end)
    extra: dict = field(default_factory=dict)  # free-form provenance written into the checkpoint

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from {sorted(SIZES)}")
        for name in ("steps", "batch_size", "lr", "n_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta", "prior_weight", "weight_decay", "warmup", "kl_warmup", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("cond_dropout", "example_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        torch.device(self.device)


@dataclass
class SGTrainConfig(CVAETrainConfig):
    """Training the `sg` generator: the CVAE with the semantic prior."""

    out: str = "runs/sg"
    top_k: int = 5  # experts mixed into a prior
    temperature: float = 0.05  # softmax temperature over cosine similarities
    refresh_every: int = 100  # steps between recomputing the experts' latent stats

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1 or self.temperature <= 0 or self.refresh_every < 1:
            raise ValueError(f"top_k and refresh_every must be >= 1 and temperature > 0, got {self.top_k}, "
                             f"{self.refresh_every} and {self.temperature}")


def tiny(cfg: CVAETrainConfig) -> CVAETrainConfig:
    """The same job at test size: tiny widths, small batches, short warm-ups (the caller picks the steps)."""
    cfg.size, cfg.batch_size, cfg.warmup, cfg.kl_warmup = "tiny", min(cfg.batch_size, 8), 2, 5
    if isinstance(cfg, SGTrainConfig):
        cfg.refresh_every = min(cfg.refresh_every, 5)
    return cfg


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _mse(pred: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Per-element mean squared error over every kind's rows."""
    sse = sum((p - t).pow(2).sum() for p, t in zip(pred, target, strict=True))
    return sse / sum(t.numel() for t in target)


@torch.no_grad()
def experts_latents(net: LoraCVAE, data: LibraryTensors, rows_n: list[torch.Tensor],
                    chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's aggregate-posterior mean and variance `(E, Z)`, conditioned on its mean description."""
    was = net.training
    net.eval()
    mus, logvars = [], []
    for s in range(0, data.n_samples, chunk):
        owner = data.owner[s: s + chunk]
        cond = net.condition(data.desc_mean[owner])
        mu, logvar = net.encode([r[s: s + chunk] for r in rows_n], cond)
        mus.append(mu)
        logvars.append(logvar)
    net.train(was)
    return expert_stats(torch.cat(mus), torch.cat(logvars), data.owner, len(data.tasks))


class Trainer:
    """One training run; `prior` picks the KL target (standard normal, or SG's leave-one-out semantic prior)."""

    def __init__(self, cfg: CVAETrainConfig, data: LibraryTensors, net: LoraCVAE) -> None:
        self.cfg, self.data, self.net = cfg, data, net
        self.semantic = isinstance(cfg, SGTrainConfig)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            self.rows_n = net.normalise(data.rows)  # [(S, L, r, d)], fixed once the normaliser is fit
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def prior(self, desc: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.semantic:
            return None, None
        bank = ExpertBank(self.data.tasks, self.data.desc_mean, *self.stats, self.cfg.top_k, self.cfg.temperature)
        p = bank.prior(desc, exclude=owner)
        return p.mean, p.var

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, net, dev = self.cfg, self.net, self.data.owner.device
        idx = torch.randint(self.data.n_samples, (cfg.batch_size,), generator=self.gen).to(dev)
        owner = self.data.owner[idx]
        desc = self.data.sample_descriptions(owner, self.gen)  # (B, D)
        show = (torch.rand(cfg.batch_size, generator=self.gen) >= cfg.example_dropout).to(dev)
        ex = self.data.examples[owner] * show[:, None]  # (B, D)
        keep = (torch.rand(cfg.batch_size, generator=self.gen) >= cfg.cond_dropout).to(dev)
        cond = net.condition(desc, ex, keep)
        target = [r[idx] for r in self.rows_n]
        mu, logvar = net.encode(target, cond)
        eps = torch.randn(mu.shape, generator=self.gen).to(dev)
        recon = _mse(net.decode(mu + (0.5 * logvar).exp() * eps, cond), target)
        mu_p, var_p = self.prior(desc, owner)
        kl = gaussian_kl(mu, logvar, mu_p, var_p).mean()
        z_p = torch.zeros_like(mu) if mu_p is None else mu_p
        from_prior = _mse(net.decode(z_p, cond), target)
        beta = cfg.beta * min(1.0, (step + 1) / cfg.kl_warmup) if cfg.kl_warmup else cfg.beta
        loss = recon + beta * kl + cfg.prior_weight * from_prior
        return loss, {"loss": loss.item(), "recon": recon.item(), "kl": kl.item(), "prior_recon": from_prior.item()}

    def experts(self) -> ExpertBank | None:
        if not self.semantic:
            return None
        mean, var = experts_latents(self.net, self.data, self.rows_n)
        return ExpertBank(self.data.tasks, self.data.desc_mean, mean, var, self.cfg.top_k, self.cfg.temperature)

    def save(self, out: Path, history: list[dict]) -> Path:
        self.net.cfg.extra = {**self.cfg.extra, "train": {k: v for k, v in asdict(self.cfg).items() if k != "extra"},
                              "steps_done": len(history), "last": history[-1] if history else None}
        self.net.eval()
        save_cvae(self.net, out, self.experts())
        self.net.train()
        return out

    def run(self) -> list[dict]:
        cfg = self.cfg
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, cfg.warmup))
        history: list[dict] = []
        self.net.train()
        bar = tqdm(range(cfg.steps), desc=f"train {'sg' if self.semantic else 'cvae'}", mininterval=2.0)
        for step in bar:
            if self.semantic and step % cfg.refresh_every == 0:
                self.stats = experts_latents(self.net, self.data, self.rows_n)
            loss, parts = self.step_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            opt.step()
            sched.step()
            history.append(parts)
            bar.set_postfix(recon=f"{parts['recon']:.3f}", kl=f"{parts['kl']:.1f}", prior=f"{parts['prior_recon']:.3f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                self.save(Path(cfg.out), history)
        return history


def build_model(cfg: CVAETrainConfig, data: LibraryTensors) -> LoraCVAE:
    torch.manual_seed(cfg.seed)
    mcfg = CVAEConfig.sized(cfg.size, spec=data.spec, target_modules=data.target_modules, rank=data.rank,
                            alpha=data.alpha, embed_dim=data.desc.shape[-1], embedder=cfg.embedder)
    net = LoraCVAE(mcfg).to(cfg.device)
    check_layout(net.layout, data)
    net.fit_normaliser(data.rows)
    return net


def train(cfg: CVAETrainConfig, data: LibraryTensors | None = None) -> Path:
    """Train a `cvae` (CVAETrainConfig) or `sg` (SGTrainConfig) checkpoint into `cfg.out`; returns its path.

    Also writes `train_log.json` (per-step losses) and `report.json` (checkpoint vs library size) beside it.
    """
    t0 = time.perf_counter()
    data = data or load_library_tensors(cfg.library, cfg.embeddings, cfg.embedder, cfg.data, cfg.n_examples,
                                        cfg.device)
    net = build_model(cfg, data)
    trainer = Trainer(cfg, data, net)
    history = trainer.run()
    out = trainer.save(Path(cfg.out), history)
    report = size_report(out, cfg.library, net)
    report |= {"kind": "sg" if trainer.semantic else "cvae", "steps": cfg.steps, "seconds": time.perf_counter() - t0,
               "tasks": len(data.tasks), "snapshots": data.n_samples, "final": history[-1] if history else None}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "train_log.json").write_text(json.dumps(history))
    logger.info("wrote %s: %s", out, report)
    return out


def train_cvae(cfg: CVAETrainConfig, data: LibraryTensors | None = None) -> Path:
    if isinstance(cfg, SGTrainConfig):
        raise ValueError("train_cvae takes a CVAETrainConfig; use train_sg for an SGTrainConfig")
    return train(cfg, data)


def train_sg(cfg: SGTrainConfig, data: LibraryTensors | None = None) -> Path:
    if not isinstance(cfg, SGTrainConfig):
        raise ValueError(f"train_sg takes an SGTrainConfig, got {type(cfg).__name__}")
    return train(cfg, data)


def size_report(ckpt: Path, library: str | Path, net: LoraCVAE) -> dict:
    """The checkpoint's bytes next to the library's it stands in for."""
    lib = library_nbytes(library) if Path(library).is_dir() else {"tasks": 0, "final_bytes": 0, "snapshot_bytes": 0}
    size = checkpoint_nbytes(ckpt)
    return {"checkpoint_bytes": size, "cvae_weights": net.num_weights(), "normaliser_values": net.num_buffer_values(),
            "library_final_bytes": lib["final_bytes"], "library_snapshot_bytes": lib["snapshot_bytes"],
            "checkpoint_over_library_final": size / lib["final_bytes"] if lib["final_bytes"] else None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["cvae", "sg"], default="cvae")
    p.add_argument("--library", default="runs/lora-library")
    p.add_argument("--out", default=None, help="checkpoint dir (default runs/<kind>)")
    p.add_argument("--embeddings", default=None, help="task embeddings safetensors (computed and saved if missing)")
    p.add_argument("--data", default=None, help="SNI data dir: use its positive examples as in-context condition")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--size", choices=["default", "large", "tiny"], default=None)
    p.add_argument("--top-k", type=int, default=None, help="sg only")
    p.add_argument("--temperature", type=float, default=None, help="sg only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="test-size model and a few steps")
    return p


def config_from_args(args: argparse.Namespace) -> CVAETrainConfig:
    cls = SGTrainConfig if args.kind == "sg" else CVAETrainConfig
    given = {"library": args.library, "out": args.out, "embeddings": args.embeddings, "data": args.data,
             "device": args.device, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "beta": args.beta, "size": args.size, "seed": args.seed}
    if args.kind == "sg":
        given |= {"top_k": args.top_k, "temperature": args.temperature}
    if args.tiny and args.steps is None:
        given["steps"] = TINY_STEPS
    cfg = cls(**{k: v for k, v in given.items() if v is not None})
    return tiny(cfg) if args.tiny else cfg


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(train(config_from_args(parser().parse_args())))
