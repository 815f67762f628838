"""The model deployments `Router` (the retriever and its FAISS index) and `LLM` (the base model, a byte-bounded
adapter cache, and batched multi-adapter decoding), and what every deployment shares; `Generator` (the
hypernetworks) is in serve/generator_deployment.py.

Each takes the whole `ServeConfig` (as a dict, so `serve deploy` can pass it) and is bound into the
application by `serve.app.build_app`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ray import serve

from serve.config import ServeConfig
from serve.engine_config import GenerationJob
from serve.errors import GenerationFailed, InvalidAdapter, ServiceError, UnknownAdapter, WrongBaseModel
from serve.llm_batching import Failed, Group, Queued, drain, enqueue_unsplit
from serve.logs import route_logs_to_serve
from serve.metrics import REGISTRY
from serve.protocol import Accepted, LLMRequest, LLMResult, fold, public_model_name, same_base_model
from serve.results import Delta
from serve.startup import Phases

if TYPE_CHECKING:
    from generator.lora import LoraAdapter  # torch: imported by the replica's model code, not by this module

logger = logging.getLogger(__name__)
# ids one LLM replica advertises for routing (memory is bounded by engine.cache_bytes, not by this). Serve sets a
# gauge per advertised id every 0.1 s in the replica: 256 ids took ~10% of a busy CPU replica's time. An id that
# dropped out of the advertised set but is still in the engine's cache is not read from disk again.
MAX_MULTIPLEXED_ADAPTERS = 64
# @serve.batch batches decoding at once. Serve forms a batch as soon as requests arrive, not when the engine is
# free, so batches join the running decode batch between steps (continuous batching) instead of queueing; a batch
# holds its place until its last request finishes, so under a steady stream of requests (small batches) this, times
# llm_batch.max_batch_size, caps the sequences decoding together: with 8, 64 clients on the H200 decoded about 10
# rows together and the rest queued. Keep llm_batch.max_batch_size x 64 <= the LLM's max_ongoing_requests (Serve
# warns otherwise).
LLM_CONCURRENT_BATCHES = 64


def _configure(config: dict[str, Any] | ServeConfig) -> ServeConfig:
    cfg = config if isinstance(config, ServeConfig) else ServeConfig.model_validate(config)
    route_logs_to_serve()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch  # here: `hyperlora serve` binds these deployments without torch; the model replicas need it

    torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)  # Ray sets OMP_NUM_THREADS=1 in replicas
    return cfg


def _set_batching(method, settings) -> None:
    method.set_max_batch_size(settings.max_batch_size)
    method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)


@serve.deployment(name="Router", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
class Router:
    """Inputs -> ranked library adapters with weights; re-syncs its index when the library changes."""

    def __init__(self, config: dict[str, Any]) -> None:
        from generator.config import load_spec
        from generator.encoder import TaskEncoder
        from retriever.library import AdapterLibrary
        from retriever.router import Router as RetrieverRouter

        phases = Phases()
        cfg = _configure(config)
        library = AdapterLibrary(cfg.library_root(), load_spec(cfg.base_model))
        phases.mark("library")
        encoder = TaskEncoder.load(cfg.embedder, cfg.device)
        phases.mark("embedder")
        # the index syncs in the background (keying a few hundred adapters takes a minute on a CPU); routes wait
        self.router = RetrieverRouter(library, encoder, cfg.retriever_config(), background=True)
        phases.mark("router")
        self.startup = phases.as_dict()
        _set_batching(self.route, cfg.router_batch)
        self._seconds = REGISTRY.histogram("hyperlora_route_seconds", "One batched routing call (embedding included).")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def route(self, calls: list[tuple[list[str], int]]) -> list[list[dict[str, Any]]]:
        """Each call is (inputs, top_k); all inputs are embedded in one encoder call."""
        t0 = time.perf_counter()
        flat = [t for inputs, _ in calls for t in inputs]

        def run() -> list[list[dict[str, Any]]]:
            self.router.refresh()
            queries = self.router.embed(flat)  # (n, dim)
            out, i = [], 0
            for inputs, k in calls:
                out.append([r.to_dict() for r in self.router.route_vectors(queries[i: i + len(inputs)], k)])
                i += len(inputs)
            return out

        out = await asyncio.to_thread(run)
        dt = time.perf_counter() - t0
        self._seconds.observe(dt)
        logger.info("routed %d input(s) from %d request(s) in %.1f ms", len(flat), len(calls), 1e3 * dt)
        return out

    async def info(self) -> dict[str, Any]:
        """What the index holds now, without waiting for a re-sync (keying a freshly filled library takes a
        minute or two on the CPU; /healthz must answer meanwhile)."""
        return {"adapters": self.router.n_adapters, "index": self.router.index_type or "building",
                "startup": self.startup}

    async def metrics(self) -> list[dict[str, Any]]:
        return REGISTRY.snapshot()


@serve.deployment(name="LLM", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class LLM:
    """The base model with per-sample adapters: concurrent requests are decoded as one batch."""

    def __init__(self, config: dict[str, Any]) -> None:
        from generator.sanity import base_norms_from_model
        from retriever.library import AdapterLibrary

        phases = Phases()
        cfg = _configure(config)
        from serve.engine import load_engine

        self.engine = load_engine(cfg.base_model, cfg.engine)
        phases.mark("model")
        self.library = AdapterLibrary(cfg.library_root(), self.engine.spec)
        self.limits = cfg.adapter_limits
        self.base_norms = base_norms_from_model(self.engine.model, self.engine.spec)
        phases.mark("library_and_norms")
        self.startup = phases.as_dict()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llm-decode")
        self._drains: set[asyncio.Future] = set()
        self._waiting: list[tuple[list[Queued], asyncio.Queue]] = []  # @serve.batch batches not yet decoding
        self._pump_task: asyncio.Future | None = None
        self._engine_jobs = 0  # adapter loads waiting for the decode thread: a run of steps yields to them
        _set_batching(self._decode, cfg.llm_batch)
        self._decode.set_max_batch_size(min(cfg.llm_batch.max_batch_size, cfg.engine.max_batch_size))

    # -- adapters
    @serve.multiplexed(max_num_models_per_replica=MAX_MULTIPLEXED_ADAPTERS)
    async def _library_adapter(self, adapter_id: str) -> str:
        """Load a library adapter into the engine cache (unless it is there: library adapters never change, and
        it passed the checks when it was loaded); Serve then routes its traffic to this replica."""
        if adapter_id not in self.engine.cache:
            await self._on_engine_thread(self._load_from_library, adapter_id)
        return adapter_id

    async def _on_engine_thread(self, fn, *args):
        """`fn(*args)` on the decode thread: every piece of engine work that touches the device runs on that one
        thread, between decode steps. (A CUDA graph captured while another thread copies an adapter to the GPU
        fails, and the copy fails with it: that step then runs eagerly, and the request gets a 500.)"""
        self._engine_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._engine_jobs -= 1

    def _load_from_library(self, adapter_id: str) -> None:
        from generator.peft_io import AdapterFormatError
        from retriever.library import AdapterNotFound, InvalidAdapterId

        try:
            record = self.library.get(adapter_id)
            adapter = self.library.load(adapter_id)
        except (AdapterNotFound, InvalidAdapterId) as e:
            raise UnknownAdapter(f"no adapter with id {adapter_id!r}", param="model") from e
        except (AdapterFormatError, ValueError) as e:
            raise InvalidAdapter(f"adapter {adapter_id!r} cannot be loaded: {e}") from e
        if not same_base_model(record.base_model, self.engine.spec.name):
            raise WrongBaseModel(f"adapter {adapter_id!r} is for {public_model_name(record.base_model)}, but this "
                                 f"service serves {public_model_name(self.engine.spec.name)}")
        self._add(adapter_id, adapter)

    def _add(self, key: str, adapter: LoraAdapter) -> None:
        """Into the engine's cache, once it passes the sanity limits (every way in: library, inline, reloads)."""
        from generator.sanity import AdapterRejected, check_adapter

        try:
            check_adapter(adapter, self.limits, self.base_norms)
        except AdapterRejected as e:
            raise InvalidAdapter(f"adapter {key!r} was refused: {e}") from e
        self.engine.add_adapter(key, adapter)

    async def _ensure_adapters(self, req: LLMRequest) -> None:
        from generator.lora import LoraAdapter

        for key, _ in req.adapters:
            if key in req.inline:
                value = req.inline[key]
                if not isinstance(value, LoraAdapter):
                    req.inline[key] = value = await value  # an ObjectRef from the gateway
                if key not in self.engine.cache:
                    await self._on_engine_thread(self._add, key, value)
            else:
                await self._library_adapter(key)
                if key not in self.engine.cache:  # the multiplex LRU still knew it, the byte LRU had dropped it
                    await self._on_engine_thread(self._load_from_library, key)

    def _reload_missing(self, req: LLMRequest) -> None:
        """Right before a batch: bring back adapters evicted since the request was admitted."""
        for key, _ in req.adapters:
            if key not in self.engine.cache:
                if key in req.inline:
                    self._add(key, req.inline[key])
                else:
                    self._load_from_library(key)

    def _reload_all(self, reqs: list[LLMRequest]) -> list[ServiceError | None]:
        """`_reload_missing` for every request (one executor hop for a whole admission); each one's error or None."""
        errors: list[ServiceError | None] = []
        for req in reqs:
            try:
                self._reload_missing(req)
                errors.append(None)
            except ServiceError as e:
                errors.append(e)
        return errors

    # -- generation
    async def generate(self, req: LLMRequest) -> LLMResult:
        t0, queued = time.perf_counter(), []
        result = fold([ev async for ev in self._run(req, incremental=False, queued=queued)])
        q, end = queued[0], time.perf_counter()
        admitted = q.admitted_at or end
        result.timings = {"llm_prepare": 1e3 * (q.queued_at - t0), "llm_queue": 1e3 * (admitted - q.queued_at),
                          "llm_decode": 1e3 * (end - admitted)}
        return result

    async def generate_stream(self, req: LLMRequest) -> AsyncGenerator[Accepted | Delta, None]:
        async for ev in self._run(req, incremental=True):
            yield ev

    async def _run(self, req: LLMRequest, incremental: bool, queued: list[Queued] | None = None
                   ) -> AsyncGenerator[Accepted | Delta, None]:
        """Accepted, then the request's deltas: every step's when `incremental` (streamed), else one at the end
        (its coroutine is not woken for every token, and its text is decoded once). `queued` receives the
        request's queue entry (its times)."""
        await self._ensure_adapters(req)
        engine = self.engine
        ids = engine.encode_chat(req.messages) if req.messages is not None else engine.encode_prompt(req.prompt or "")
        job = GenerationJob(ids, req.adapters, req.max_new_tokens, req.temperature, req.top_p, req.seed, req.stop,
                            req.logprobs, req.ignore_eos, incremental)
        yield Accepted(len(ids))
        entry = Queued(job, req)
        if queued is not None:
            queued.append(entry)
        steps = enqueue_unsplit(self._decode, entry)
        async for item in steps:
            if item is None:  # a batch-mate's step
                continue
            if isinstance(item, Failed):
                raise item.error
            if item.finish_reason == "error":  # this request alone failed; its batch-mates carry on
                self._drains.add(task := asyncio.ensure_future(drain(steps)))
                task.add_done_callback(self._drains.discard)
                raise GenerationFailed(item.error or "generation failed")
            yield item
            if item.finish_reason is not None:
                # answer now; the batch ends this request's stream one step later, consumed in the background
                self._drains.add(task := asyncio.ensure_future(drain(steps)))
                task.add_done_callback(self._drains.discard)
                return

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02, max_concurrent_batches=LLM_CONCURRENT_BATCHES)
    async def _decode(self, items: list[Queued]) -> AsyncGenerator[list[Any], None]:
        """One @serve.batch batch: handed to the engine pump, which merges it into the running decode batch;
        yields every step's per-request deltas."""
        out: asyncio.Queue = asyncio.Queue()
        self._waiting.append((items, out))
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.ensure_future(self._pump())
        while (step := await out.get()) is not None:
            yield step

    async def _pump(self) -> None:
        """Continuous batching: one running decode batch (`DecodeBatch`, or `SlotBatch` on the static step);
        queued @serve.batch batches join it between steps."""
        loop = asyncio.get_running_loop()
        limit = self.engine.cfg.max_batch_size
        batch = None
        owners: dict[int, tuple[Group, int]] = {}  # sequence index -> (its @serve.batch batch, position)
        groups: list[Group] = []
        while True:
            joining = self._joining(batch, limit)
            if joining:  # every @serve.batch batch that fits joins at once: one prefill for all of them
                groups += joining
                batch = batch or self.engine.new_batch()
                await self._admit(loop, batch, joining, owners)
            if batch is None or batch.done:
                if batch is not None and batch.seqs:
                    batch.log_done()
                batch, owners = None, {}
                groups = [g for g in groups if not g.flush({})]
                if not self._waiting:
                    return
                continue

            def deliver(deltas: list[tuple[int, Delta]], owners=owners) -> None:  # on the event loop
                nonlocal groups
                by_group: dict[int, dict[int, Delta]] = {}
                for j, d in deltas:
                    group, pos = owners[j]
                    by_group.setdefault(id(group), {})[pos] = d
                groups = [g for g in groups if not g.flush(by_group.get(id(g), {}))]

            try:
                await loop.run_in_executor(self._executor, self._steps, loop, batch, deliver)
            except Exception as e:  # noqa: BLE001 - every request in the batch gets the error
                for g in groups:
                    g.fail_all(e)
                groups, batch, owners = [], None, {}

    def _steps(self, loop: asyncio.AbstractEventLoop, batch, deliver) -> None:
        """Decode steps on the decode thread, one after another, until the batch is done or the event loop has
        work for this thread (batches waiting to join, adapter loads): one hop to the thread per run of steps,
        not per step, so a busy event loop does not stall the device. Each step's deltas go to the event loop as
        they come (`deliver`, in order; all of them before this call's own completion)."""
        while True:
            deltas = batch.step()
            if deltas:
                loop.call_soon_threadsafe(deliver, deltas)
            if batch.done or self._engine_jobs or self._can_join(batch):
                return

    def _can_join(self, batch) -> bool:
        """Whether the first waiting @serve.batch batch fits into `batch` now (as `_joining` admits them)."""
        waiting = self._waiting  # appended to by the event loop meanwhile; only the pump takes from it
        return bool(waiting) and batch.can_join and len(waiting[0][0]) <= self.engine.cfg.max_batch_size - batch.active

    def _joining(self, batch, limit: int) -> list[Group]:
        """The waiting @serve.batch batches that fit into the running decode batch now (the first one always
        starts a new decode batch), taken off the waiting list in order."""
        if self._waiting and batch is not None and not batch.can_join:
            return []
        room = limit - (batch.active if batch is not None else 0)
        joining: list[Group] = []
        while self._waiting and (len(self._waiting[0][0]) <= room or (batch is None and not joining)):
            joining.append(Group(*self._waiting.pop(0)))
            room -= len(joining[-1].items)
        return joining

    async def _admit(self, loop, batch, groups: list[Group], owners: dict[int, tuple[Group, int]]) -> None:
        """Prefill the requests of `groups` into `batch` together; a request that cannot join fails alone."""
        items = [(g, p) for g in groups for p in range(len(g.items))]
        errors = await loop.run_in_executor(self._executor, self._reload_all, [g.items[p].request for g, p in items])
        ok = []
        for (group, pos), error in zip(items, errors, strict=True):
            if error is None:
                ok.append((group, pos))
            else:
                group.failed[pos] = error
        if not ok:
            return
        try:
            seq_ids = await loop.run_in_executor(self._executor, batch.add, [g.items[p].job for g, p in ok])
        except Exception as e:  # noqa: BLE001 - e.g. a prompt that leaves no room to generate
            if len(ok) == 1:
                ok[0][0].failed[ok[0][1]] = e
                return
            # `add` fails before it changes the batch: admit one by one, so only the culprit fails
            for group, pos in ok:
                await self._admit_one(loop, batch, group, pos, owners)
            return
        now = time.perf_counter()
        for j, (group, pos) in zip(seq_ids, ok, strict=True):
            owners[j] = (group, pos)
            group.live.add(pos)
            group.items[pos].admitted_at = now

    async def _admit_one(self, loop, batch, group: Group, pos: int, owners: dict[int, tuple[Group, int]]) -> None:
        it = group.items[pos]

        def add() -> list[int]:  # its adapters again first: a large admission may have evicted them
            self._reload_missing(it.request)
            return batch.add([it.job])

        try:
            (j,) = await loop.run_in_executor(self._executor, add)
        except Exception as e:  # noqa: BLE001 - reported to this request only
            group.failed[pos] = e
            return
        owners[j] = (group, pos)
        group.live.add(pos)
        it.admitted_at = time.perf_counter()

    async def health(self) -> dict[str, Any]:
        return {"cached_adapters": len(self.engine.cache), "cache_bytes": self.engine.cache.nbytes,
                "device": str(self.engine.device), "dtype": self.engine.cfg.dtype, "startup": self.startup}

    async def metrics(self) -> list[dict[str, Any]]:
        return REGISTRY.snapshot()
