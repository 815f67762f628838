"""One typed config per training job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from generator.models import DEFAULT_BASE_MODEL
from generator.spec import DEFAULT_TARGETS, check_targets


def _positive(obj, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ValueError(f"{n} must be > 0, got {getattr(obj, n)}")


@dataclass
class TrainConfig:
    """Shared by every job: the base model, the data and where to run."""

    base_model: str = DEFAULT_BASE_MODEL  # embedded default, a local HF dir, or a dir holding one .gguf
    data: str | None = None  # SNI data dir (manifest.json + tasks/); None: ../shared/data/sni
    device: str = "cpu"  # torch device
    dtype: Literal["float32", "bfloat16"] = "float32"  # base model weights; LoRA factors stay float32
    seed: int = 0
    max_prompt_tokens: int = 256  # prompts are cut from the left to this
    max_answer_tokens: int = 64  # answers are cut to this (stop token included)
    limit_tasks: int | None = None  # use only the first N tasks of a split (smoke runs)

    def __post_init__(self) -> None:
        _positive(self, "max_prompt_tokens", "max_answer_tokens")


@dataclass
class LoraTrainConfig:
    """Per-task LoRAs (`train lora-library`) and the multi-task baseline (`train multitask-lora`)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 100  # optimizer steps per adapter
    lr: float = 1e-3
    per_task: int = 8  # examples of each task in a step (library) / total batch (multitask)
    tasks_per_batch: int = 146  # how many tasks' LoRAs train together in one batched forward
    snapshots: int = 4  # last checkpoints kept per task (the CVAE's per-task distribution)
    snapshot_every: int = 5  # steps between those checkpoints

    def __post_init__(self) -> None:
        self.target_modules = check_targets(list(self.target_modules))
        _positive(self, "rank", "steps", "lr", "per_task", "tasks_per_batch", "snapshots", "snapshot_every")


@dataclass
class HypernetTrainConfig:
    """Text-to-LoRA training, by reconstruction of the library or end to end (SFT)."""

    mode: Literal["recon", "sft"] = "sft"
    variant: Literal["L", "M", "S"] = "M"
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    hidden_dim: int = 512
    n_blocks: int = 2
    dropout: float = 0.05  # in the hypernetwork's task encoder and trunk
    steps: int = 1000
    lr: float = 2e-4
    weight_decay: float = 1e-2
    tasks_per_step: int = 32  # tasks (each with a sampled description) per step
    per_task: int = 4  # examples per task per step (sft)
    warmup: int = 50
    description_pool: Literal["descriptions", "descriptions+definition"] = "descriptions+definition"  # sampled per
    # step: the paraphrased descriptions alone (the first shipped checkpoint) or with the SNI definition too
    embed_noise: float = 0.0  # sft/recon: std of Gaussian noise added to each sampled (unit-norm) description
    # embedding in training, so nearby unseen descriptions map to similar adapters
    definition_rate: float = 0.5  # sft: probability that a sample's prompt instruction is the task's definition
    # rather than the description its adapter was generated from (evaluation and most users give a definition-like
    # instruction; serving puts the description itself in front)
    val_tasks: int = 0  # sft: train tasks held out to pick the step (early stopping); 0 keeps the last step
    base_adapter: str | None = None  # sft: a PEFT LoRA (e.g. the multi-task LoRA trained without the val tasks)
    # that every generated adapter contains as fixed leading ranks: the network learns a residual on top of it
    eval_every: int = 100  # sft: steps between validation losses
    ema: float = 0.0  # decay of an exponential moving average of the network's weights, which is what validation
    # sees and what is saved (0: off; e.g. 0.99 averages about the last 100 steps)
    mismatch_rate: float = 0.0  # sft: share of a step's tasks whose adapter is generated from a description of one
    # of their nearest other train tasks while the prompt (instruction, examples, answer) stays their own: the
    # imperfect adapter an unseen task gets, so adapters learn to follow the prompt instead of imposing the answer
    # words of the tasks they were trained on
    mismatch_neighbours: int = 8  # sft: how many nearest train tasks (by mean description embedding) a mismatched
    # task's adapter description is drawn from
    example_rate: float = 1 / 3  # sft: share of samples with one or two of the task's positive examples as earlier
    # chat turns (training.data.EXAMPLE_RATE)
    relabel_copies: int = 0  # sft: train on up to this many relabelled copies of each qualifying classification
    # task too, whose answer words only the instruction gives (training.relabel; held-out tasks' copies never)
    init_seed: int | None = None  # seed of the network's initialisation (None: the run's seed, TrainConfig.seed);
    # runs that share it and differ in their sampling seed start from the same weights, so they can be averaged
    snapshot_steps: tuple[int, ...] = ()  # also save the network (its average with `ema`) after these steps, into
    # OUT/step-N: a run on all train tasks keeps the step a held-out run chose

    def __post_init__(self) -> None:
        if self.description_pool not in ("descriptions", "descriptions+definition"):
            raise ValueError(f"description_pool must be 'descriptions' or 'descriptions+definition', "
                             f"got {self.description_pool!r}")
        if self.mode not in ("recon", "sft"):
            raise ValueError(f"mode must be 'recon' or 'sft', got {self.mode!r}")
        self.target_modules = check_targets(list(self.target_modules))
        _positive(self, "rank", "steps", "lr", "tasks_per_step", "per_task", "eval_every")
        if self.val_tasks < 0:
            raise ValueError(f"val_tasks must be >= 0, got {self.val_tasks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embed_noise < 0:
            raise ValueError(f"embed_noise must be >= 0, got {self.embed_noise}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (0: off), got {self.ema}")
        if any(s <= 0 or s > self.steps for s in self.snapshot_steps):
            raise ValueError(f"snapshot_steps must lie in 1..steps={self.steps}, got {list(self.snapshot_steps)}")
        for name in ("mismatch_rate", "example_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        _positive(self, "mismatch_neighbours")
        if self.relabel_copies < 0:
            raise ValueError(f"relabel_copies must be >= 0 (0: off), got {self.relabel_copies}")
        if not 0.0 <= self.definition_rate <= 1.0:
            raise ValueError(f"definition_rate must be in [0, 1], got {self.definition_rate}")
