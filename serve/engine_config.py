"""The LLM engine's config, what one job asks of it, and the request ranges it relies on: plain data, no torch, so
the Gateway (which validates the whole `ServeConfig` and the requests) and the `hyperlora serve` command import it
without the engine. serve/engine.py, serve/static_step.py and serve/sampling.py re-export what they own from here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from generator.spec import MODULE_PARENTS

if TYPE_CHECKING:
    import torch

MIN_TEMPERATURE = 0.01  # a positive temperature below this is greedy (the API maps it to 0)
MAX_TEMPERATURE = 2.0
MIN_SEED = -(2**63)  # what torch.Generator.manual_seed takes
MAX_SEED = 2**64 - 1


@dataclass
class StaticDecodeConfig:
    """Sizes of the static decode path (KV slots, adapter pool, graphs)."""

    max_len: int = 0  # positions per KV slot (prompt + completion); 0: max_prompt_tokens + max_new_tokens
    pool_slots: int = 0  # adapters held in the device pool at once; 0: twice the max batch size
    pool_rank: int = 16  # pool rank: lower-rank adapters are zero-padded, higher ones are refused
    max_mix: int = 4  # most adapters mixed in one row
    cuda_graphs: bool = True  # capture one CUDA graph per shape on CUDA (never on the CPU)
    min_window: int = 64  # smallest attention window; windows double up to max_len
    # fused: norm, residual adds and rotary fused into fewer kernels (one rounding each); hf: rounded where HF
    # Llama rounds (bf16 tokens closer to the dynamic path's, a few more kernels per layer)
    numerics: Literal["fused", "hf"] = "fused"
    # compile: the step's and the prefill's math through torch.compile (inductor) before capture, which fuses norms,
    # rotary, the KV write and the SwiGLU into fewer kernels; each (batch, window, mix, sample) shape compiles once
    # (tens of seconds on first use), so it is off by default and for benchmarks or servers that warm every shape up
    compile: bool = False
    # prefill: "static" runs the prompts through the same math straight into the new rows' KV slots (right-padded,
    # causal, the rows' LoRA from the pool; far fewer kernels than the model's forward); "model" is one HF
    # forward over the left-padded prompts with the per-sample LoRA injected, its cache then copied into slots
    prefill: Literal["static", "model"] = "static"
    prefill_tokens: int = 16384  # prompt tokens (rows x longest prompt) per prefill chunk (>= 1)

    def __post_init__(self) -> None:
        for name in ("max_len", "pool_slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("pool_rank", "max_mix", "min_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.numerics not in ("fused", "hf"):
            raise ValueError(f"numerics must be one of ['fused', 'hf'], got {self.numerics!r}")
        if self.prefill not in ("static", "model"):
            raise ValueError(f"prefill must be one of ['static', 'model'], got {self.prefill!r}")
        if self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {self.prefill_tokens}")


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # EngineConfig.dtype: torch dtypes of these names
# torch device types a config may name (torch.device itself is not imported here)
DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|mtia|meta|xla|privateuseone)(:\d+)?")


@dataclass
class EngineConfig:
    """How the LLM engine batches, bounds and places work."""

    max_batch_size: int = 32  # most sequences decoded in one batch (the LLM deployment's @serve.batch size)
    max_prompt_tokens: int = 1024  # a longer prompt is refused with 413
    max_new_tokens: int = 512  # most tokens a request may ask for
    cache_bytes: int = 512 * 2**20  # adapter LRU budget on the engine's device, in bytes
    device: str = "cpu"  # torch device of the base model and the cached adapters
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # base model and adapter dtype
    targets: tuple[str, ...] = tuple(MODULE_PARENTS)  # module types wrapped for per-sample LoRA
    compact_fraction: float = 0.25  # drop finished rows once this fraction of the batch is finished
    decode: Literal["auto", "dynamic", "static"] = "auto"  # static: KV slots + fixed-shape step; auto: static on cuda
    static: StaticDecodeConfig = field(default_factory=StaticDecodeConfig)  # sizes of the static decode path

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_prompt_tokens", "max_new_tokens", "cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")
        if not 0.0 < self.compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in (0, 1], got {self.compact_fraction}")
        if self.decode not in ("auto", "dynamic", "static"):
            raise ValueError(f"decode must be one of ['auto', 'dynamic', 'static'], got {self.decode!r}")
        if isinstance(self.static, dict):
            self.static = StaticDecodeConfig(**self.static)
        self.targets = tuple(self.targets)
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


@dataclass
class GenerationJob:
    """One sequence to complete. `adapters` are (cache key, weight) pairs; empty means the base model."""

    prompt_ids: list[int]
    adapters: tuple[tuple[str, float], ...] = ()
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (the end-of-turn token always stops)
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    ignore_eos: bool = False  # vLLM's: the end-of-turn/EOS tokens do not stop it (stop strings still do)
    incremental: bool = True  # a Delta every step (streaming); False: one Delta with everything when it finishes
