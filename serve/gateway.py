"""The gateway's state (library, unsaved adapters, auth, adapter lookup), its handles to the model
deployments, and the `Gateway` ingress deployment that serves `serve.api.build_api`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ray import serve

from generator.lora import LoraAdapter
from generator.spec import ModelSpec
from serve.config import ServeConfig
from serve.errors import Forbidden, Unauthorized, UnknownAdapter, WrongBaseModel
from serve.metrics import REGISTRY
from serve.protocol import Accepted, LLMRequest, LLMResult, public_model_name, same_base_model
from serve.schemas import AdapterInfo

logger = logging.getLogger(__name__)
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})
EPHEMERAL_PREFIX = "tmp-"


def check_mutation(headers: dict[str, str], client_host: str | None, api_key: str | None, env_name: str) -> None:
    """Mutations need the API key when one is set; without one, only localhost may mutate."""
    if api_key:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorized("this endpoint changes the library: send the API key as `Authorization: Bearer <key>`")
        return
    if client_host not in LOCAL_HOSTS:
        raise Forbidden(f"{env_name} is unset, so the library can be changed from localhost only")


@dataclass
class _Ephemeral:
    info: AdapterInfo
    adapter: LoraAdapter  # on the CPU
    share: Callable[[LoraAdapter], Any] | None  # makes what LLM requests carry (a Ray object reference)
    _ref: Any = None

    @property
    def ref(self) -> Any:
        """What LLM requests carry: put in the object store on first use, not on the generate path."""
        if self._ref is None:
            self._ref = self.share(self.adapter) if self.share is not None else self.adapter
        return self._ref


class EphemeralStore:
    """Generated adapters that were not saved: kept in this gateway's memory, least recently used dropped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, _Ephemeral] = OrderedDict()
        self.nbytes = 0

    def put(self, adapter: LoraAdapter, info: AdapterInfo, share: Callable[[LoraAdapter], Any] | None) -> None:
        size = adapter.nbytes()
        while self._items and self.nbytes + size > self.max_bytes:
            old_id, old = self._items.popitem(last=False)
            self.nbytes -= old.adapter.nbytes()
            logger.info("dropped unsaved adapter %s from gateway memory (LRU)", old_id)
        self._items[info.id] = _Ephemeral(info, adapter, share)
        self.nbytes += size

    def get(self, adapter_id: str) -> _Ephemeral | None:
        item = self._items.get(adapter_id)
        if item is not None:
            self._items.move_to_end(adapter_id)
        return item

    def remove(self, adapter_id: str) -> bool:
        item = self._items.pop(adapter_id, None)
        if item is not None:
            self.nbytes -= item.adapter.nbytes()
        return item is not None

    def infos(self) -> list[AdapterInfo]:
        return [e.info for e in self._items.values()]


class Backends:
    """The gateway's calls to the model deployments, through Serve handles."""

    def __init__(self, generator, router, llm, timeout_s: float) -> None:
        self.generator, self.router, self.llm = generator, router, llm
        self.timeout_s = timeout_s

    async def generate(self, descriptions: list[str], generator: str) -> tuple[list[LoraAdapter], float]:
        return await asyncio.wait_for(self.generator.generate.remote((generator, descriptions)), self.timeout_s)

    async def adapt(self, descriptions: list[str], generator: str,
                    strategy: str | None) -> tuple[list[dict[str, Any]], list[LoraAdapter | None], float]:
        """(decisions, adapters, ms): the description strategy's choice per description (retriever/strategy.py)."""
        return await asyncio.wait_for(self.generator.adapt.remote((generator, descriptions, strategy)),
                                      self.timeout_s)

    async def route(self, inputs: list[str], top_k: int) -> list[dict[str, Any]]:
        return await asyncio.wait_for(self.router.route.remote((inputs, top_k)), self.timeout_s)

    def _llm(self, req: LLMRequest):
        main = req.main_adapter()
        return self.llm.options(multiplexed_model_id=main) if main else self.llm

    async def complete(self, req: LLMRequest) -> LLMResult:
        return await asyncio.wait_for(self._llm(req).generate.remote(req), self.timeout_s)

    def stream(self, req: LLMRequest) -> AsyncIterator[Accepted | Any]:
        return self._llm(req).options(stream=True).generate_stream.remote(req)

    def share(self, adapter: LoraAdapter) -> Any:
        """A reference LLM replicas can fetch the adapter by, put in the object store once."""
        import ray

        return ray.put(adapter)

    async def info(self) -> dict[str, Any]:
        gen, rt, llm = await asyncio.gather(self.generator.info.remote(), self.router.info.remote(),
                                            self.llm.health.remote())
        return {"generator": gen, "router": rt, "llm": llm}

    async def snapshots(self) -> list[tuple[str, list[dict[str, Any]]]]:
        parts = await asyncio.gather(self.generator.metrics.remote(), self.router.metrics.remote(),
                                     self.llm.metrics.remote(), return_exceptions=True)
        return [(name, snap) for name, snap in zip(("generator", "router", "llm"), parts, strict=True)
                if not isinstance(snap, BaseException)]


@dataclass
class GatewayState:
    """What the HTTP handlers share."""

    cfg: ServeConfig
    spec: ModelSpec
    library: Any  # retriever.library.AdapterLibrary
    backends: Backends
    ephemeral: EphemeralStore
    generator_trained: bool = True
    generator: str = "t2l"  # the default generator
    generators: tuple[str, ...] = ("t2l",)  # every generator the Generator deployment serves
    base_names: frozenset[str] = field(default_factory=frozenset)
    started: float = field(default_factory=time.time)

    def api_key(self) -> str | None:
        return os.environ.get(self.cfg.api_key_env) or None

    def authorize(self, request) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        host = request.client.host if request.client else None
        check_mutation(headers, host, self.api_key(), self.cfg.api_key_env)

    @property
    def model_name(self) -> str:
        return public_model_name(self.spec.name)

    def record_info(self, record) -> AdapterInfo:
        d = record.to_dict()
        d["base_model"] = public_model_name(d["base_model"])
        return AdapterInfo(saved=True, **{k: d[k] for k in AdapterInfo.model_fields if k in d and k != "object"})

    def lookup(self, adapter_id: str) -> tuple[AdapterInfo, Any | None]:
        """An adapter's info and, for an unsaved one, what carries it to the LLM; 404 or 400 otherwise."""
        from retriever.library import AdapterNotFound, InvalidAdapterId

        eph = self.ephemeral.get(adapter_id)
        if eph is not None:
            return eph.info, eph.ref
        try:
            record = self.library.get(adapter_id)
        except (AdapterNotFound, InvalidAdapterId):
            raise UnknownAdapter(f"no adapter with id {adapter_id[:80]!r}", param="id") from None
        if not same_base_model(record.base_model, self.spec.name):
            raise WrongBaseModel(f"adapter {adapter_id} was made for {public_model_name(record.base_model)}, but this "
                                 f"service serves {self.model_name}", param="id")
        return self.record_info(record), None

    def new_ephemeral_id(self) -> str:
        return EPHEMERAL_PREFIX + uuid.uuid4().hex


@serve.deployment(name="Gateway", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Gateway:
    """The FastAPI ingress composing Generator, Router and LLM."""

    def __init__(self, config: dict[str, Any], generator, router, llm) -> None:
        from generator.config import load_spec
        from retriever.library import AdapterLibrary
        from serve.deployments import route_logs_to_serve

        route_logs_to_serve()
        cfg = ServeConfig.model_validate(config)
        spec = load_spec(cfg.base_model)
        self.state = GatewayState(
            cfg=cfg, spec=spec, library=AdapterLibrary(cfg.library_root(), spec),
            backends=Backends(generator, router, llm, cfg.request_timeout_s),
            ephemeral=EphemeralStore(cfg.ephemeral_bytes), generator=cfg.generator, generators=(cfg.generator,),
            base_names=frozenset({spec.name, public_model_name(spec.name), PurePath(spec.name).name, "base"}),
        )
        if self.state.api_key() is None:
            logger.warning("%s is unset: adapter save/upload/delete are accepted from localhost only",
                           cfg.api_key_env)
        REGISTRY.histogram("hyperlora_http_request_seconds", "Gateway request latency.", tag_keys=("route", "status"))

    async def _generator_trained(self) -> None:
        try:
            info = await self.state.backends.generator.info.remote()
            self.state.generator_trained = bool(info["trained"])
            self.state.generators = tuple(info.get("generators", [info["generator"]]))
        except Exception as e:  # noqa: BLE001 - only a flag in responses; logged
            logger.warning("could not ask the generator whether it is trained: %s", e)

    def __serve_build_asgi_app__(self):
        from serve.api import build_api

        return build_api(self.state, on_startup=self._generator_trained)
