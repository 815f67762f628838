"""The shared optimisation loop: per-sample LoRA factors through the frozen base model."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from generator.apply import AdapterBank, LoraInjector
from training.data import EXAMPLE_RATE, Batcher, Task, answer_loss, sample_pairs

# (task indices of this step, in batch order) -> stacked factors A {m: (n, L, r, d_in)}, B {m: (n, L, d_out, r)}
FactorFn = Callable[[list[int]], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def lora_step_loss(model, injector: LoraInjector, batcher: Batcher, tasks: Sequence[Task], task_ids: list[int],
                   factors: FactorFn, scaling: float, per_task: int, rng: random.Random, device,
                   instructions: Sequence[str] | None = None, example_rate: float = EXAMPLE_RATE) -> torch.Tensor:
    """Loss of one step: `per_task` examples of each task, each sample through its own task's factors, each
    prompt with its task's instruction (`instructions[k]` for `task_ids[k]`; default the definitions) and, in
    `example_rate` of the samples, one or two of its positive examples as earlier turns."""
    chosen = [tasks[i] for i in task_ids]
    batch = batcher.batch(sample_pairs(batcher.tok, chosen, per_task, rng, instructions, example_rate), device)
    a, b = factors(task_ids)
    bank = AdapterBank.from_factors(a, b, scaling)
    index = torch.arange(len(task_ids), device=device).repeat_interleave(per_task)  # (batch,)
    with injector.use(bank.gather(index)):
        return answer_loss(model, batch)


def run_steps(params: Sequence[torch.nn.Parameter], steps: int, lr: float, loss_fn: Callable[[int], torch.Tensor],
              desc: str, warmup: int = 0, weight_decay: float = 0.0,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with warm-up + cosine decay; returns the loss of every step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    losses = []
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
