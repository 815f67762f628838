"""The `Gateway` ingress deployment: it builds the state (serve.state) and serves the routes (serve.api) on it."""

from __future__ import annotations

import logging
from pathlib import PurePath
from typing import Any

from ray import serve

from serve.api import build_api
from serve.config import ServeConfig
from serve.metrics import REGISTRY
from serve.protocol import public_model_name
from serve.startup import Phases
from serve.state import Backends, GatewayState, check_mutation  # noqa: F401 - re-exported
from serve.unsaved import UnsavedStore

logger = logging.getLogger(__name__)


@serve.deployment(name="Gateway", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Gateway:
    """The FastAPI ingress composing Generator, Router and LLM."""

    def __init__(self, config: dict[str, Any], generator, router, llm) -> None:
        from serve.logs import route_logs_to_serve

        route_logs_to_serve()
        self.state = build_state(config, generator, router, llm)
        if self.state.api_key() is None:
            logger.warning("%s is unset: adapter save/upload/delete are accepted from localhost only",
                           self.state.cfg.api_key_env)
        REGISTRY.histogram("hyperlora_http_request_seconds", "Gateway request latency.", tag_keys=("route", "status"))

    async def _generator_trained(self) -> None:
        try:
            info = await self.state.backends.generator.info.remote()
            self.state.generator_trained = bool(info["trained"])
            self.state.generators = tuple(info.get("generators", [info["generator"]]))
        except Exception as e:  # noqa: BLE001 - only a flag in responses; logged
            logger.warning("could not ask the generator whether it is trained: %s", e)

    def __serve_build_asgi_app__(self):
        return build_api(self.state, on_startup=self._generator_trained)


def build_state(config: dict[str, Any], generator, router, llm) -> GatewayState:
    """The Gateway's state on `config` and the three deployment handles, timed (`state.startup`). Neither this nor
    the routes import torch: the Gateway starts light, and torch comes in with the first adapter it handles (a
    generated one, an upload, a download); tests/test_serve_gateway.py checks it."""
    from generator.config import load_spec
    from retriever.library import AdapterLibrary

    phases = Phases()
    cfg = ServeConfig.model_validate(config)
    spec = load_spec(cfg.base_model)
    phases.mark("spec")
    state = GatewayState(
        cfg=cfg, spec=spec, library=AdapterLibrary(cfg.library_root(), spec),
        backends=Backends(generator, router, llm, cfg.request_timeout_s),
        ephemeral=UnsavedStore(cfg.unsaved_root(), cfg.ephemeral_bytes), generator=cfg.generator,
        generators=(cfg.generator,),
        base_names=frozenset({spec.name, public_model_name(spec.name), PurePath(spec.name).name, "base"}),
        replica=_replica_tag(),
    )
    phases.mark("library")
    state.startup = phases.as_dict()
    return state


def _replica_tag() -> str:
    """This replica's Serve id (the `X-Hyperlora-Replica` response header), or the process id outside Serve."""
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - not in a replica (tests)
        import os

        return f"pid-{os.getpid()}"
