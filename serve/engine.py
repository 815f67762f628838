"""The batched multi-adapter LLM engine: many requests, each with its own adapter or weighted mixture of
adapters, decoded together token by token with a KV cache. No Ray here: the `LLM` deployment wraps it,
and the benchmark and tests drive it directly.

One decode loop instead of `model.generate`: prefill the left-padded prompts once, then one forward per
step over the batch with HF's `DynamicCache`. The per-sample LoRA factors are gathered once per batch
from the adapters in the byte-bounded LRU cache (`AdapterBank.gather`) and set on the injected linears
for each forward, so a batch of 32 distinct adapters costs two extra batched matmuls per target module,
the same as a batch sharing one adapter. Finished sequences are dropped from the batch (and the cache)
once a quarter of the rows are done.

That is the dynamic path (`serve/decode.py`), the CPU's. On cuda (`EngineConfig.decode`) a Llama-family
model decodes on the static path instead (`serve/slot_batch.py`): KV slots, a GPU adapter pool and a fixed-
shape step captured as CUDA graphs. `new_batch()` hands out either; both share prefill, adapters and output.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from generator.apply import AdapterBank, LoraInjector, PerSampleLora
from generator.inference import stop_ids
from generator.lora import LoraAdapter
from generator.spec import ModelSpec
from serve.decode import DecodeBatch
from serve.engine_config import EngineConfig, GenerationJob, StaticDecodeConfig  # noqa: F401 - re-exported
from serve.errors import InvalidAdapter, PromptTooLong, UnknownAdapter
from serve.metrics import REGISTRY, SIZE_BUCKETS, Registry
from serve.results import Delta, TokenLogprob
from serve.sampling import RowSampling, choose_tokens, make_generator
from serve.slot_batch import SlotBatch, StaticDecoder

logger = logging.getLogger(__name__)

@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "error"]
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # why a sequence that finished with "error" failed

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class AdapterCache:
    """Adapters on the engine's device, least recently used evicted first once over `max_bytes`."""

    def __init__(self, max_bytes: int, device: torch.device | str, dtype: torch.dtype,
                 registry: Registry = REGISTRY) -> None:
        self.max_bytes = max_bytes
        self.device, self.dtype = torch.device(device), dtype
        self._items: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.nbytes = 0
        self.version = 0  # bumps whenever the set of cached adapters changes
        self._lock = threading.Lock()
        self._load_s = registry.histogram("hyperlora_adapter_load_seconds", "Moving an adapter into the LLM cache.")
        self._events = registry.counter("hyperlora_adapter_cache_events", "Adapter cache loads and evictions.",
                                        ("event",))

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def get(self, key: str) -> LoraAdapter | None:
        with self._lock:
            ad = self._items.get(key)
            if ad is not None:
                self._items.move_to_end(key)
            return ad

    def put(self, key: str, adapter: LoraAdapter) -> LoraAdapter:
        """Store `adapter` (moved to the device and dtype) under `key`, evicting LRU entries to fit."""
        t0 = time.perf_counter()
        ad = adapter.to(self.device, self.dtype)
        size = ad.nbytes()
        if size > self.max_bytes:
            raise InvalidAdapter(f"adapter {key!r} takes {size} bytes, more than the whole adapter cache "
                                 f"({self.max_bytes} bytes)", limit=self.max_bytes)
        with self._lock:
            if key in self._items:
                self.nbytes -= self._items.pop(key).nbytes()
            while self._items and self.nbytes + size > self.max_bytes:
                old_key, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes()
                self._events.inc(tags={"event": "evict"})
                logger.info("evicted adapter %s (%d bytes) from the LLM cache", old_key, old.nbytes())
            self._items[key] = ad
            self.nbytes += size
            self.version += 1
        dt = time.perf_counter() - t0
        self._load_s.observe(dt)
        self._events.inc(tags={"event": "load"})
        logger.info("loaded adapter %s (%d bytes) into the LLM cache in %.1f ms (%d cached, %d bytes)",
                    key, size, 1e3 * dt, len(self._items), self.nbytes)
        return ad

    def remove(self, key: str) -> bool:
        with self._lock:
            ad = self._items.pop(key, None)
            if ad is None:
                return False
            self.nbytes -= ad.nbytes()
            self.version += 1
        self._events.inc(tags={"event": "unload"})
        logger.info("unloaded adapter %s from the LLM cache", key)
        return True


@dataclass
class _Sequence:
    """Decoding state of one job."""

    job: GenerationJob
    max_new: int
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""  # text already handed out
    finish_reason: Literal["stop", "length", "error"] | None = None
    generator: torch.Generator | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    held_logprobs: list[TokenLogprob] = field(default_factory=list)  # a job that is not incremental: all so far
    error: str | None = None  # set when this row could not be sampled; the sequence ends with it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLMEngine:
    """A base model plus a cache of adapters; `stream(jobs)` decodes jobs together, each with its own mixture."""

    def __init__(self, model, tokenizer, spec: ModelSpec, cfg: EngineConfig, registry: Registry = REGISTRY) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device, cfg.torch_dtype).eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.injector = LoraInjector(self.model, spec, cfg.targets)
        self.cache = AdapterCache(cfg.cache_bytes, self.device, cfg.torch_dtype, registry)
        self.stop_token_ids = set(stop_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_token_ids)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        # transformers >= 5.2x calls the KV cache argument `cache`; earlier 5.x `past_key_values`
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._forward_lock = threading.Lock()  # the injected factors are per call: one forward at a time
        self._bank: tuple[tuple[str, ...], int, AdapterBank] | None = None
        self._batch_s = registry.histogram("hyperlora_inference_seconds", "One batch's prefill plus decode.")
        self._batch_size = registry.histogram("hyperlora_inference_batch_size", "Sequences per decoded batch.",
                                              SIZE_BUCKETS)
        self._tokens = registry.counter("hyperlora_generated_tokens", "Tokens generated by the LLM engine.")
        self._static = StaticDecoder(self) if StaticDecoder.wanted(self) else None

    # ---- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return self._check_len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self._check_len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_len(self, ids: list[int]) -> list[int]:
        limit = self.cfg.max_prompt_tokens
        if self.max_positions:
            limit = min(limit, self.max_positions - 1)
        if len(ids) > limit:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; the limit is {limit}", param="prompt", limit=limit)
        if not ids:
            raise PromptTooLong("the prompt encodes to no tokens", param="prompt", limit=limit)
        return ids

    # ---- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, key: str, adapter: LoraAdapter) -> None:
        try:
            adapter.check_fits(self.spec)
            adapter.check_finite()
        except ValueError as e:
            raise InvalidAdapter(f"adapter {key!r}: {e}") from e
        missing = set(adapter.target_modules) - set(self.injector.targets)
        if missing:
            raise InvalidAdapter(f"adapter {key!r} targets {sorted(missing)}, which this engine does not inject")
        self.cache.put(key, adapter)

    def _per_sample(self, jobs: Sequence[GenerationJob]) -> PerSampleLora | None:
        keys = list(dict.fromkeys(k for job in jobs for k, _ in job.adapters))
        if not keys:
            return None
        adapters = []
        for k in keys:
            ad = self.cache.get(k)
            if ad is None:
                raise UnknownAdapter(f"adapter {k!r} is not loaded in the LLM engine", param="model")
            adapters.append(ad)
        bank_key = (tuple(keys), self.cache.version)
        if self._bank is None or self._bank[:2] != bank_key:
            self._bank = (*bank_key, AdapterBank.from_adapters(adapters, self.spec, self.device, self.cfg.torch_dtype))
        pos = {k: i for i, k in enumerate(keys)}
        k_max = max(1, max(len(job.adapters) for job in jobs))
        index = torch.zeros(len(jobs), k_max, dtype=torch.long)  # (batch, K)
        weights = torch.zeros(len(jobs), k_max)  # (batch, K); padding slots and base-model rows weigh 0
        for i, job in enumerate(jobs):
            for j, (k, w) in enumerate(job.adapters):
                index[i, j], weights[i, j] = pos[k], float(w)
        return self._bank[2].gather(index, weights)

    # ---- decoding ------------------------------------------------------------------------------------
    def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        """Complete `jobs` together; returns one result per job, in order."""
        seqs_out: list[GenerationResult | None] = [None] * len(jobs)
        texts = [""] * len(jobs)
        ids: list[list[int]] = [[] for _ in jobs]
        lps: list[list[TokenLogprob]] = [[] for _ in jobs]
        for deltas in self.stream(jobs):
            for i, d in enumerate(deltas):
                if d is None:
                    continue
                texts[i] += d.text
                ids[i] += d.token_ids
                lps[i] += d.logprobs or []
                if d.finish_reason is not None:
                    seqs_out[i] = GenerationResult(texts[i], ids[i], d.finish_reason, len(jobs[i].prompt_ids),
                                                   lps[i] if jobs[i].logprobs is not None else None, d.error)
        return [r for r in seqs_out if r is not None]

    @torch.inference_mode()
    def stream(self, jobs: Sequence[GenerationJob], detokenize: bool = True) -> Iterator[list[Delta | None]]:
        """Yield, after every decode step, one `Delta` per job (None for jobs that finished earlier)."""
        if not jobs:
            return
        batch = self.new_batch(detokenize)
        try:
            batch.add(jobs)  # sequence i is job i
            while not batch.done:
                deltas: list[Delta | None] = [None] * len(jobs)
                for j, d in batch.step():
                    deltas[j] = d
                yield deltas
            batch.log_done()
        finally:
            batch.release()  # a failed or abandoned stream gives its KV slots back

    def new_batch(self, detokenize: bool = True) -> DecodeBatch | SlotBatch:
        """An empty decode batch: on the static step's slots when this engine has them and they are free."""
        batch = self._static.open(detokenize) if self._static is not None else None
        return batch if batch is not None else DecodeBatch(self, detokenize)

    def _new_sequence(self, job: GenerationJob) -> _Sequence:
        max_new = min(job.max_new_tokens, self.cfg.max_new_tokens)
        if self.max_positions:
            max_new = min(max_new, self.max_positions - len(job.prompt_ids))
        if max_new < 1:
            raise PromptTooLong(f"the prompt ({len(job.prompt_ids)} tokens) leaves no room to generate within "
                                f"{self.max_positions} positions", param="prompt", limit=self.max_positions)
        gen = make_generator(job.seed, self.device) if job.temperature > 0 else None
        return _Sequence(job, max_new, generator=gen)

    def _prefill(self, jobs, lora):
        from transformers import DynamicCache

        longest = max(len(j.prompt_ids) for j in jobs)
        input_ids = torch.full((len(jobs), longest), self.pad_id, dtype=torch.long)  # (batch, T), left-padded
        mask = torch.zeros(len(jobs), longest, dtype=torch.long)
        for i, job in enumerate(jobs):
            n = len(job.prompt_ids)
            input_ids[i, longest - n:] = torch.tensor(job.prompt_ids)
            mask[i, longest - n:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (batch, T)
        cache = DynamicCache()
        logits = self._forward(input_ids, mask, pos, cache, lora)
        return cache, mask, pos[:, -1] + 1, logits

    def _forward(self, input_ids, mask, pos, cache, lora) -> torch.Tensor:
        with self._forward_lock, self.injector.use(lora):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1].float()  # (rows, vocab)

    def _choose(self, logits: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
        """Next token per row (serve.sampling); a row that cannot be sampled gets the pad token and an error."""
        rows = [RowSampling(s.job.temperature, s.job.top_p, s.generator) for s in seqs]
        tokens, failed = choose_tokens(logits, rows, self.pad_id)  # (rows,)
        for r in failed:
            seqs[r].error = ("the model's next-token scores were not finite for this request (its adapter or "
                             "mixture is numerically unstable)")
        wants = [r for r, s in enumerate(seqs) if s.job.logprobs is not None and r not in failed]
        if wants:
            lp = torch.log_softmax(logits[wants].float(), -1)  # (n, vocab)
            for n, r in enumerate(wants):
                k = seqs[r].job.logprobs or 0
                top_v, top_i = lp[n].topk(k) if k else (lp.new_zeros(0), tokens.new_zeros(0))
                tok = int(tokens[r])
                top = {self.tokenizer.convert_ids_to_tokens(int(i)): float(v)
                       for v, i in zip(top_v, top_i, strict=True)}
                seqs[r].pending_logprobs = [TokenLogprob(self.tokenizer.convert_ids_to_tokens(tok),
                                                         float(lp[n, tok]), top)]
        return tokens

    def _advance(self, seq: _Sequence, token: int, detokenize: bool) -> Delta | None:
        """Take `token` into `seq`; what to hand out, or None for a job that is not `incremental` and not finished
        (it gets one Delta, with all its text and tokens, when it finishes: no text decoded on the way, unless
        stop strings need it)."""
        if seq.error is not None:
            seq.finish_reason = "error"
            return Delta("", [], "error", error=seq.error)
        seq.token_ids.append(token)
        job = seq.job
        if token in self.stop_token_ids and not job.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= seq.max_new:
            seq.finish_reason = "length"
        lps, seq.pending_logprobs = seq.pending_logprobs or None, []
        if job.incremental:
            return self._delta(seq, token, lps, detokenize)
        seq.held_logprobs += lps or []
        if seq.finish_reason is None and not job.stop:
            return None
        self._delta(seq, token, lps, detokenize)  # checks stop strings; `seq.emitted` holds the text so far
        if seq.finish_reason is None:
            return None
        return Delta(seq.emitted, list(seq.token_ids), seq.finish_reason, seq.held_logprobs or None)

    def _delta(self, seq: _Sequence, token: int, lps: list[TokenLogprob] | None, detokenize: bool) -> Delta:
        """The text `token` adds to `seq` (held back while it could still become a stop string)."""
        job = seq.job
        if not detokenize and not job.stop:
            return Delta("", [token], seq.finish_reason, lps)
        text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
        if job.stop:
            hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
            if hits:
                text, seq.finish_reason = text[: min(hits)], "stop"
        ready = len(text)
        if seq.finish_reason is None:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                ready = len(text.rstrip("\ufffd"))
            if job.stop:  # hold back what could still become a stop string
                ready = max(len(seq.emitted), ready - (max(len(s) for s in job.stop) - 1))
        new = text[len(seq.emitted):ready] if ready > len(seq.emitted) else ""
        seq.emitted += new
        return Delta(new, [token], seq.finish_reason, lps)


def load_model(base_model: str, gguf_file: str | None = None):
    """(model, tokenizer, spec) of the embedded default or a local HF directory, or of `gguf_file` in `base_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if gguf_file:
        model = AutoModelForCausalLM.from_pretrained(base_model, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base_model, gguf_file=gguf_file)
        name = "HuggingFaceTB/SmolLM2-135M-Instruct" if "SmolLM2-135M-Instruct" in gguf_file else gguf_file
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        from generator.config import load_spec
        from generator.models import load_base_model

        model, tokenizer = load_base_model(base_model)
        name = load_spec(base_model).name
    logger.info("loaded base model %s in %.1f s", name, time.perf_counter() - t0)
    return model.eval(), tokenizer, ModelSpec.from_hf_config(model.config, name)


def load_engine(base_model: str, cfg: EngineConfig, registry: Registry = REGISTRY,
                gguf_file: str | None = None) -> LLMEngine:
    model, tokenizer, spec = load_model(base_model, gguf_file)
    return LLMEngine(model, tokenizer, spec, cfg, registry)
