"""Continuous batching on the static step: sequences hold KV slots and adapter-pool slots, and every decode
step is one fixed-shape step (a CUDA graph replay on CUDA) over the smallest batch bucket that covers the
live slots.

`SlotBatch` has `DecodeBatch`'s interface (`add`, `step`, `done`, `active`, `can_join`, `log_done`), so the
engine's `stream` and the LLM deployment's pump drive either. Prefill runs the new rows' prompts through
the static step's math straight into their slots, with their LoRA from the pool (`StaticDecodeConfig.prefill`
"static"; "model" runs the engine's own HF forward and copies its cache into the slots); its logits give the
rows' first tokens. Then `step()` launches the next step, hands out the tokens the previous one chose (the
one host sync per step; on CUDA the next step is queued before the host waits, so the device never idles
between steps), and frees the slots of finished rows. The engine's runtime types are only named for type
checkers: imports run one way, engine -> slot_batch -> static_prefill -> static_step -> kv_slots / adapter_pool /
device_sampling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from serve.adapter_pool import AdapterPool
from serve.device_sampling import choose_tokens
from serve.errors import PromptTooLong, UnknownAdapter
from serve.kv_slots import KVSlots
from serve.results import Delta, TokenLogprob, log_batch_done
from serve.static_prefill import StaticPrefill
from serve.static_step import StaticStep, buckets, supports

if TYPE_CHECKING:
    from serve.engine import GenerationJob, LLMEngine, _Sequence

logger = logging.getLogger(__name__)


class StaticDecoder:
    """An engine's KV slots, adapter pool and static step; one `SlotBatch` uses them at a time."""

    def __init__(self, engine: LLMEngine) -> None:
        cfg, st = engine.cfg, engine.cfg.static
        conf = engine.model.config
        max_len = st.max_len or cfg.max_prompt_tokens + cfg.max_new_tokens
        if engine.max_positions:
            max_len = min(max_len, engine.max_positions)
        max_len = -(-max_len // 64) * 64  # attention windows in whole 64-position blocks (aligned masks)
        n_kv = conf.num_key_value_heads or conf.num_attention_heads
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
        n = cfg.max_batch_size  # slot and pool row n: the spare one, for the prefill's padding rows
        self.slots = KVSlots(conf.num_hidden_layers, n, n_kv, max_len, head_dim, engine.device, cfg.torch_dtype,
                             spare=1)
        self.pool = AdapterPool(engine.spec, engine.injector.targets, st.pool_slots or 2 * n, st.pool_rank,
                                engine.device, cfg.torch_dtype, n + 1, st.max_mix)
        self.step = StaticStep(engine.model, engine.spec, self.slots, self.pool, st, engine.device)
        self.prefill = StaticPrefill(self.step, n, spare=n)
        self.batch_buckets = buckets(cfg.max_batch_size)
        self.windows = buckets(max_len, min(st.min_window, max_len))
        self.engine = engine
        self._lock = threading.Lock()
        cuda = engine.device.type == "cuda"  # each step's tokens come back through a pinned buffer, after an event
        self.host_tokens = torch.zeros(n + 1, dtype=torch.long, pin_memory=True) if cuda else None
        self.copied = torch.cuda.Event() if cuda else None
        logger.info("static decode: %d KV slots x %d positions (%.0f MiB), adapter pool %d x rank %d (%.0f MiB), "
                    "CUDA graphs %s", cfg.max_batch_size, max_len, self.slots.nbytes() / 2**20,
                    self.pool.n_slots, self.pool.rank, self.pool.nbytes() / 2**20, self.step.use_graphs)

    @staticmethod
    def wanted(engine: LLMEngine) -> bool:
        """Whether `engine` decodes on the static step (raises if asked to but the model cannot)."""
        mode = engine.cfg.decode
        if mode == "dynamic" or (mode == "auto" and engine.device.type != "cuda"):
            return False
        why = supports(engine.model)
        if why and mode == "static":
            raise ValueError(f"decode='static' but {why}; use decode='dynamic'")
        if why:
            logger.warning("decoding with the dynamic batch: %s", why)
        return why is None

    def open(self, detokenize: bool = True) -> SlotBatch | None:
        """A new batch on the slots, or None while another batch holds them."""
        if not self._lock.acquire(blocking=False):
            return None
        return SlotBatch(self, detokenize)

    def bucket(self, values: list[int], sizes: list[int]) -> int:
        return next(s for s in sizes if s >= max(values))


class SlotBatch:
    """Sequences decoded together on KV slots; `add` may be called between `step`s while slots are free."""

    def __init__(self, decoder: StaticDecoder, detokenize: bool = True) -> None:
        self.decoder, self.engine, self.detokenize = decoder, decoder.engine, detokenize
        self.seqs: list[_Sequence] = []
        self.live: dict[int, int] = {}  # KV slot -> sequence index
        self.next_pos: dict[int, int] = {}  # KV slot -> position of its next input token
        self.t0 = time.perf_counter()
        self.n_tokens = 0
        self.adapters: set[str] = set()
        self._released = False
        self._shape: tuple[int, int, bool] | None = None  # the next step's (bucket, mixture entries, sampling)
        self._top_pos = 0  # largest position a live row writes in the next step, minus one

    @property
    def can_join(self) -> bool:
        return self.decoder.slots.n_free > 0

    @property
    def active(self) -> int:
        return len(self.live)

    @property
    def done(self) -> bool:
        return not self.live

    @torch.inference_mode()
    def add(self, jobs: Sequence[GenerationJob]) -> list[int]:
        """Prefill `jobs` into free slots; returns their sequence indices."""
        eng, dec, st = self.engine, self.decoder, self.decoder.step
        if len(jobs) > dec.slots.n_free:
            raise ValueError(f"{len(self.live)} + {len(jobs)} rows exceed max_batch_size={eng.cfg.max_batch_size}")
        for job in jobs:
            if len(job.adapters) > st.cfg.max_mix:
                raise ValueError(f"a request mixes {len(job.adapters)} adapters; the static decoder mixes at most "
                                 f"{st.cfg.max_mix} (engine.static.max_mix)")
            if len(job.prompt_ids) >= dec.slots.max_len:
                raise PromptTooLong(f"the prompt ({len(job.prompt_ids)} tokens) leaves no room in KV slots of "
                                    f"{dec.slots.max_len} positions", param="prompt", limit=dec.slots.max_len - 1)
        seqs = [eng._new_sequence(j) for j in jobs]
        for s in seqs:
            s.max_new = min(s.max_new, dec.slots.max_len - len(s.job.prompt_ids))
        pool_slots = self._pool_slots(jobs)
        lengths = [len(j.prompt_ids) for j in jobs]
        if st.cfg.prefill == "model":
            cache, _, _, logits = eng._prefill(jobs, eng._per_sample(jobs))  # logits (rows, vocab)
        slots = dec.slots.take(len(jobs))
        try:
            idx = torch.tensor(slots, device=st.device)  # the new rows, once on the device
            sample = self._set_rows(idx, seqs, pool_slots, lengths)
            if st.cfg.prefill == "model":
                dec.slots.fill(slots, lengths, [(layer.keys, layer.values) for layer in cache.layers])
            else:  # straight into the slots, with the rows' LoRA just assigned
                logits = dec.prefill(slots, [j.prompt_ids for j in jobs], max(len(j.adapters) for j in jobs))
            self._first_tokens(idx, logits, sample)
        except Exception:
            dec.slots.release(slots)
            raise
        first = len(self.seqs)
        self.seqs += seqs
        for n, s in enumerate(slots):
            self.live[s], self.next_pos[s] = first + n, lengths[n]
        self._shape, self._top_pos = None, max(self.next_pos.values())
        self.adapters |= {k for j in jobs for k, _ in j.adapters}
        return list(range(first, first + len(jobs)))

    def _pool_slots(self, jobs: Sequence[GenerationJob]) -> dict[str, int]:
        eng = self.engine
        wanted = {}
        for k in dict.fromkeys(k for job in jobs for k, _ in job.adapters):
            ad = eng.cache.get(k)
            if ad is None:
                raise UnknownAdapter(f"adapter {k!r} is not loaded in the LLM engine", param="model")
            wanted[k] = ad
        pinned = {k for j in self.live.values() for k, _ in self.seqs[j].job.adapters}
        return self.decoder.pool.slots_for(wanted, pinned)

    def _set_rows(self, idx: torch.Tensor, seqs: list[_Sequence], pool_slots: dict[str, int], lengths: list[int]
                  ) -> bool:
        """Write the buffers of the new rows `idx` (their adapters' pool slots and weights, sampling, positions);
        whether any of them samples."""
        st = self.decoder.step
        dev, k = st.device, st.cfg.max_mix
        index = torch.zeros(len(seqs), k, dtype=torch.long)  # (rows, K)
        weights = torch.zeros(len(seqs), k)
        for r, s in enumerate(seqs):
            for j, (key, w) in enumerate(s.job.adapters):
                index[r, j], weights[r, j] = pool_slots[key], float(w)
        temp = torch.tensor([float(s.job.temperature) for s in seqs])
        seeds = torch.tensor([_seed(s) for s in seqs], dtype=torch.long)
        self.decoder.pool.assign(idx, index.to(dev), weights.to(dev))
        st.temperature[idx], st.seed[idx] = temp.to(dev), seeds.to(dev)
        st.top_p[idx] = torch.tensor([float(s.job.top_p) for s in seqs], device=dev)
        st.pos[idx] = torch.tensor(lengths, device=dev)
        st.counter[idx] = 0
        return bool((temp > 0).any())

    def _first_tokens(self, idx: torch.Tensor, logits: torch.Tensor, sample: bool) -> None:
        """Choose the first tokens of the new rows `idx` from the prefill logits `(rows, vocab)`."""
        st = self.decoder.step
        logits = logits.float()
        st.logits[idx] = logits
        st.tokens[idx] = choose_tokens(logits, st.temperature[idx], st.top_p[idx], st.seed[idx], st.counter[idx],
                                       sample)
        st.counter[idx] = 1

    @torch.inference_mode()
    def step(self) -> list[tuple[int, Delta]]:
        """Launch the next step, hand out the tokens the last one chose, free finished rows' slots."""
        eng = self.engine
        if not self.live:
            return []
        more = any(len(self.seqs[j].token_ids) + 1 < self.seqs[j].max_new for j in self.live.values())
        want = [s for s, j in self.live.items() if self.seqs[j].job.logprobs is not None]
        chosen, logits = self._read_and_launch(max(self.live) + 1, more, want)
        for s, row in logits.items():
            seq = self.seqs[self.live[s]]
            seq.pending_logprobs = [_logprob(eng.tokenizer, row, chosen[s], seq.job.logprobs)]
        out, finished = [], []
        for s, j in sorted(self.live.items()):
            seq = self.seqs[j]
            delta = eng._advance(seq, chosen[s], self.detokenize)
            if delta is not None:  # None: a job that is not incremental, not finished yet
                out.append((j, delta))
            if seq.finished:
                finished.append(s)
        self.n_tokens += len(self.live)
        self._free(finished)
        return out

    def _read_and_launch(self, top: int, more: bool, want: list[int]) -> tuple[list[int], dict[int, torch.Tensor]]:
        """The tokens the last step chose for slots 0..top-1 and its logits for the slots `want`, with the next step
        launched when `more`."""
        dec, st = self.decoder, self.decoder.step
        if dec.host_tokens is None:  # CPU: read, then run the next step (it overwrites tokens and logits)
            chosen, logits = st.tokens[:top].tolist(), {s: st.logits[s].clone() for s in want}
            if more:
                self._launch()
            return chosen, logits
        # CUDA: queue the copy of this step's tokens (and logits), then the next step, and only then wait for the
        # copy: the device never idles while the host hands out tokens and launches the following step
        dec.host_tokens[:top].copy_(st.tokens[:top], non_blocking=True)
        logits = {s: st.logits[s].clone() for s in want}
        dec.copied.record()
        if more:
            self._launch()
        dec.copied.synchronize()
        return dec.host_tokens[:top].tolist(), logits

    def _free(self, slots: list[int]) -> None:
        if not slots:
            return
        for s in slots:
            del self.live[s], self.next_pos[s]
        self.decoder.slots.release(slots)
        idx = torch.tensor(slots, device=self.decoder.step.device)
        self.decoder.step.pos[idx] = 0  # freed rows of a bucket keep computing harmlessly at position 0
        self._shape = None

    def _launch(self) -> None:
        dec = self.decoder
        if self._shape is None:  # (bucket, mixture entries, sampling) change only when rows join or leave
            jobs = [self.seqs[j].job for j in self.live.values()]
            self._shape = (dec.bucket([s + 1 for s in self.live], dec.batch_buckets),
                           max(len(j.adapters) for j in jobs), any(j.temperature > 0 for j in jobs))
        b, k, sample = self._shape
        self._top_pos += 1
        dec.step.run(b, dec.bucket([self._top_pos], dec.windows), k, sample)
        for s in self.next_pos:
            self.next_pos[s] += 1

    def log_done(self) -> None:
        log_batch_done(self, "static")
        self.release()

    def release(self) -> None:
        """Give the slots back to the decoder (finished or abandoned batches)."""
        if self._released:
            return
        self._released = True
        self._free(list(self.live))
        self.decoder._lock.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _seed(seq: _Sequence) -> int:
    if seq.job.seed is not None:
        return int(seq.job.seed) & 0x7FFFFFFFFFFFFFFF
    return seq.generator.initial_seed() & 0x7FFFFFFFFFFFFFFF if seq.generator is not None else 0


def _logprob(tokenizer, logits: torch.Tensor, token: int, k: int):
    """The chosen token's logprob and the top `k` alternatives from one row's logits `(vocab,)`."""
    lp = torch.log_softmax(logits.float(), -1)
    top_v, top_i = lp.topk(k) if k else (lp.new_zeros(0), lp.new_zeros(0, dtype=torch.long))
    top = {tokenizer.convert_ids_to_tokens(int(i)): float(v) for v, i in zip(top_v, top_i, strict=True)}
    return TokenLogprob(tokenizer.convert_ids_to_tokens(token), float(lp[token]), top)
