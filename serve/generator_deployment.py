"""The `Generator` deployment: descriptions -> LoRA adapters with the hypernetwork(s), and the default library
filled in the background when the service starts."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from serve.config import ServeConfig
from serve.deployments import _configure, _set_batching
from serve.metrics import REGISTRY
from serve.protocol import public_model_name
from serve.startup import Phases

if TYPE_CHECKING:
    from generator.lora import LoraAdapter  # torch: imported by the replica's model code, not by this module

logger = logging.getLogger(__name__)
FILL_AFTER_S = 60.0  # the default library starts filling at the first info call (the service is up), or after this


@serve.deployment(name="Generator", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class Generator:
    """Descriptions -> LoRA adapters; concurrent requests share one hypernetwork forward (`@serve.batch`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from generator.config import build_generator, load_spec

        phases = Phases()
        cfg = _configure(config)
        self.gen = build_generator(cfg.generator_config(), load_spec(cfg.base_model))
        phases.mark("generator")
        if not self.gen.trained:
            logger.warning("NO TRAINED HYPERNETWORK CHECKPOINT: serving a FRESHLY INITIALISED %s generator; its "
                           "adapters are well-formed but carry no task knowledge", self.gen.name)
        self.gens = {self.gen.name: self.gen} | load_other_generators(cfg, self.gen)
        phases.mark("other_generators")
        self._torch = threading.Lock()  # one hypernetwork call at a time: requests and the library fill
        self.library_fill: dict[str, Any] = {"state": "off" if not cfg.default_library else "waiting"}
        self._fill = _Once(self._fill_library, cfg) if cfg.default_library else None
        if self._fill is not None:  # in the background once the service answers (its first /healthz or info
            timer = threading.Timer(FILL_AFTER_S, self._fill.start)  # call), or after FILL_AFTER_S anyway
            timer.daemon = True
            timer.start()
        # the description strategy keys the library (a while for a few hundred adapters): in the background too;
        # POST /v1/adapters waits for it, completions and /healthz do not
        self._strategy = in_background(_description_strategy, cfg, self.gen)
        phases.mark("strategy")
        self.startup = phases.as_dict()
        _set_batching(self.generate, cfg.generator_batch)
        _set_batching(self.adapt, cfg.generator_batch)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hypernet")  # one warm thread for torch
        self._seconds = REGISTRY.histogram("hyperlora_generation_seconds", "One batched hypernetwork call.")
        self._count = REGISTRY.counter("hyperlora_generated_adapters", "Adapters generated.")

    @property
    def strategy(self):
        """The description strategy (retriever/strategy.py), once its background start is done."""
        return self._strategy.result()

    def _fill_library(self, cfg: ServeConfig) -> None:
        """The default library, filled once (idempotent by task name; trained LoRAs if present, else adapters this
        generator makes, a chunk at a time between requests). `library_fill` says how it went (in /healthz)."""
        from retriever.default import ensure_default_library

        self.library_fill = {"state": "filling"}
        t0 = time.perf_counter()
        try:
            library = ensure_default_library(cfg.library_root(), _Locked(self.gen, self._torch), spec=self.gen.spec,
                                             progress=False)
        except Exception as e:  # noqa: BLE001 - reported in /healthz; requests are served regardless
            logger.exception("filling the default library failed")
            self.library_fill = {"state": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
            return
        dt = time.perf_counter() - t0
        self.library_fill = {"state": "ready", "adapters": len(library), "seconds": round(dt, 1)}
        logger.info("library %s holds %d adapters (checked/filled in %.1f s)", library.root.name, len(library), dt)

    async def info(self) -> dict[str, Any]:
        if self._fill is not None:
            self._fill.start()  # the service answers: the default library may take the spare CPU now
        return {"generator": self.gen.name, "trained": bool(self.gen.trained), "rank": self.gen.rank,
                "alpha": self.gen.alpha, "strength": self.gen.strength,
                "base_model": public_model_name(self.gen.spec.name),
                "generators": sorted(self.gens), "default_library": dict(self.library_fill), "startup": self.startup}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def generate(self, requests: list[tuple[str, list[str]]]) -> list[tuple[list[LoraAdapter], float]]:
        """Each request is (generator name, descriptions); one batched call per generator named in the batch."""
        out: list[tuple[list[LoraAdapter], float] | None] = [None] * len(requests)
        for kind in dict.fromkeys(k for k, _ in requests):
            mine = [i for i, (k, _) in enumerate(requests) if k == kind]
            if kind not in self.gens:
                raise ValueError(f"generator {kind!r} is not served here; available: {', '.join(sorted(self.gens))}")
            flat = [d for i in mine for d in requests[i][1]]
            t0 = time.perf_counter()
            adapters = await asyncio.get_running_loop().run_in_executor(self._executor, self._generate, kind, flat)
            dt = time.perf_counter() - t0
            self._seconds.observe(dt)
            self._count.inc(len(adapters))
            logger.info("generated %d adapter(s) with %s for %d request(s) in one batch in %.1f ms",
                        len(adapters), kind, len(mine), 1e3 * dt)
            j = 0
            for i in mine:
                n = len(requests[i][1])
                out[i] = (adapters[j: j + n], 1e3 * dt)
                j += n
        return out

    def _generate(self, kind: str, descriptions: list[str]) -> list[LoraAdapter]:
        with self._torch:
            return self.gens[kind].generate(descriptions)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def adapt(self, requests: list[tuple[str, list[str], str | None]]) -> list[tuple[list[dict], list, float]]:
        """Each request is (generator, descriptions, strategy): every description is embedded once (one call for the
        batch), matched against the library and decided (retriever/strategy.py); the generated or mixed adapters
        come from that same embedding. Returns per request (decisions, adapters or None for library ones, ms)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._adapt, requests)

    def _adapt(self, requests: list[tuple[str, list[str], str | None]]) -> list[tuple[list[dict], list, float]]:
        t0 = time.perf_counter()
        unknown = sorted({k for k, _, _ in requests} - set(self.gens))
        if unknown:
            raise ValueError(f"generator {unknown[0]!r} is not served here; available: {', '.join(sorted(self.gens))}")
        flat = [d for _, texts, _ in requests for d in texts]
        bounds = np.cumsum([0] + [len(texts) for _, texts, _ in requests])
        import torch

        with self._torch:
            vectors = self.strategy.embed(flat)  # (n, dim)
            decisions = [d for (_, _, strategy), a, b in zip(requests, bounds[:-1], bounds[1:], strict=True)
                         for d in self.strategy.decide_vectors(vectors[a:b], strategy)]
            kinds = [k for k, texts, _ in requests for _ in texts]
            generated: dict[int, LoraAdapter] = {}
            for kind in dict.fromkeys(kinds):
                rows = [i for i, d in enumerate(decisions)
                        if kinds[i] == kind and d.needs_generation and not d.rejected]
                if rows:
                    made = self.gens[kind].generate_embedded(torch.from_numpy(vectors[rows]), [flat[i] for i in rows])
                    generated.update(zip(rows, made, strict=True))
                    self._count.inc(len(made))
            adapters = [None if d.rejected else self.strategy.build(d, generated.get(i))
                        for i, d in enumerate(decisions)]
        dt = time.perf_counter() - t0
        self._seconds.observe(dt)
        logger.info("adapted %d description(s) from %d request(s) in %.1f ms: %s", len(flat), len(requests),
                    1e3 * dt, ", ".join(d.path for d in decisions))
        return [([d.to_dict() for d in decisions[a:b]], adapters[a:b], 1e3 * dt)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    async def metrics(self) -> list[dict[str, Any]]:
        return REGISTRY.snapshot()


def in_background(fn, *args) -> Future:
    """`fn(*args)` in a daemon thread (it never holds up the replica's exit), as a Future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the result, and logged
            logger.exception("%s failed in the background", getattr(fn, "__name__", fn))
            future.set_exception(e)

    threading.Thread(target=run, name=getattr(fn, "__name__", "background"), daemon=True).start()
    return future


class _Once:
    """Runs `fn(*args)` in a daemon thread the first time `start` is called, whoever calls it."""

    def __init__(self, fn, *args) -> None:
        self._fn, self._args, self._lock, self._started = fn, args, threading.Lock(), False

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._fn, args=self._args, name="default-library", daemon=True).start()


class _Locked:
    """A generator whose `generate` holds a lock, so the library fill and requests take turns (per chunk)."""

    def __init__(self, gen, lock: threading.Lock) -> None:
        self._gen, self._lock = gen, lock

    def generate(self, descriptions):
        with self._lock:
            return self._gen.generate(descriptions)

    def __getattr__(self, name: str):  # name, trained, spec, net (its fingerprint), ...
        return getattr(self._gen, name)


def _description_strategy(cfg: ServeConfig, gen):
    """The retriever's description-level decision over the service's library, sharing the generator's encoder."""
    from retriever.library import AdapterLibrary
    from retriever.strategy import DescriptionStrategy

    library = AdapterLibrary(cfg.library_root(), gen.spec)
    return DescriptionStrategy(library, gen.encoder, cfg.strategy_config(), cfg.retriever_config())


def load_other_generators(cfg: ServeConfig, default) -> dict[str, Any]:
    """`cfg.other_generators` that have a checkpoint, sharing the default generator's encoder."""
    from generator.generate import GENERATORS, default_checkpoint
    from generator.models import DEFAULT_BASE_MODEL

    out = {}
    for kind, ckpt in cfg.other_generators.items():
        if kind == default.name:
            continue
        path = ckpt or (default_checkpoint(kind) if cfg.base_model == DEFAULT_BASE_MODEL else None)
        if path is None:
            logger.info("generator %s is not served: no checkpoint for %s (set other_generators.%s)", kind,
                        cfg.base_model, kind)
            continue
        out[kind] = GENERATORS[kind].from_checkpoint(path, default.encoder, default.spec, cfg.device)
        logger.info("also serving generator %s from %s", kind, Path(path).name)
    return out
