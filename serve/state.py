"""What the HTTP routes share: the gateway's state (library, unsaved adapters, auth, adapter lookup), its
handles to the model deployments, and the request checks every route uses.

Imports go one way: `serve.gateway` (the deployment) -> `serve.api` / `serve.completions` (routes) -> this
module (state); nothing here imports a route module.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import Header

from generator.spec import ModelSpec
from serve.config import ServeConfig
from serve.errors import Forbidden, Invalid, InvalidAdapter, TooLarge, Unauthorized, UnknownAdapter, WrongBaseModel
from serve.protocol import Accepted, LLMRequest, LLMResult, public_model_name, same_base_model
from serve.schemas import AdapterInfo, encodable
from serve.unsaved import EPHEMERAL_PREFIX, UnsavedStore

if TYPE_CHECKING:
    from generator.lora import LoraAdapter  # torch; only the Generator's adapters bring it

logger = logging.getLogger(__name__)
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})
# bodies a web page can send to another origin without a CORS preflight (an HTML form, or fetch "no-cors")
FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded", "text/plain"})


def cross_site_signal(headers: dict[str, str]) -> str | None:
    """Why a request may come from a web page of another origin, or None: an `Origin` / `Referer` naming another
    host than `Host`, `Sec-Fetch-Site: cross-site|same-site`, or a form-type body."""
    host = headers.get("host", "").lower()
    for name in ("origin", "referer"):
        value = headers.get(name)
        if value and (value == "null" or urlsplit(value).netloc.lower() != host):
            return f"its {name.title()} ({value[:80]}) is another origin than this service's ({host or 'unknown'})"
    if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        return "the browser marked it Sec-Fetch-Site: " + headers["sec-fetch-site"]
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in FORM_TYPES:
        return f"it is a {ctype} post, which any web page can send (send the archive as the request body, " \
               f"Content-Type: application/octet-stream)"
    return None


def check_mutation(headers: dict[str, str], client_host: str | None, api_key: str | None, env_name: str) -> None:
    """Mutations need the API key when one is set. Without one, only a loopback client may mutate, and only with
    no sign of a web page of another origin behind the request (any site a local user visits could send it)."""
    if api_key:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorized("this endpoint changes the library: send the API key as `Authorization: Bearer <key>`")
        return
    if client_host not in LOCAL_HOSTS:
        raise Forbidden(f"{env_name} is unset, so the library can be changed from localhost only")
    why = cross_site_signal(headers)
    if why:
        raise Forbidden(f"{env_name} is unset, so the library can be changed only by local programs, not web pages; "
                        f"this request was refused because {why}. Set {env_name} and send it as "
                        f"`Authorization: Bearer <key>` to allow it")


def idempotent_ids(key: str | None, n: int) -> list[str | None]:
    """Library ids for the `n` adapters a request stores, derived from its `Idempotency-Key` header (the same key
    gives the same ids, so a request sent again stores nothing new: retriever.library.AdapterLibrary.add), or new
    ids (None) without one. Serve's proxy adds a key to every storing request that lacks one (serve/proxy_retry.py),
    so the copy it sends again after a replica died is recognised."""
    if key is None:
        return [None] * n
    return [hashlib.sha256(f"{key}\0{i}".encode()).hexdigest()[:32] for i in range(n)]


IdempotencyKey = Header(None, alias="Idempotency-Key", min_length=1, max_length=200,
                        description="Any string you choose: the same request sent again with the same key stores "
                                    "nothing new and answers with the adapter(s) the first one stored. Serve's proxy "
                                    "adds one when it is missing, to send the request again safely after a replica "
                                    "died.")


def check_texts(texts: list[str], what: str, max_items: int, max_chars: int) -> list[str]:
    """422 for empty or non-Unicode strings, 413 for too many or too long ones."""
    if len(texts) > max_items:
        raise TooLarge(f"{len(texts)} {what}s given; the limit is {max_items}", param=what, limit=max_items)
    for i, t in enumerate(texts):
        if not t.strip():
            raise Invalid(f"{what} #{i} is empty", param=what)
        if len(t) > max_chars:
            raise TooLarge(f"{what} #{i} is {len(t)} characters; the limit is {max_chars}", param=what, limit=max_chars)
        try:
            encodable(t)
        except ValueError as e:
            raise Invalid(f"{what} #{i} {e}", param=what) from None
    return [t.strip() for t in texts]


class Backends:
    """The gateway's calls to the model deployments, through Serve handles."""

    def __init__(self, generator, router, llm, timeout_s: float) -> None:
        self.generator, self.router, self.llm = generator, router, llm
        self.timeout_s = timeout_s

    async def _call(self, method, arg: Any) -> Any:
        """`method.remote(arg)`, sent once more if the replica died while on it: these calls change nothing, and
        Serve's router sends the second one to a live replica (a restarted one, when it was the only one)."""
        from ray.exceptions import RayActorError

        try:
            return await asyncio.wait_for(method.remote(arg), self.timeout_s)
        except RayActorError as e:
            logger.warning("a replica died during a call (%s); sending it again", type(e).__name__)
        return await asyncio.wait_for(method.remote(arg), self.timeout_s)

    async def generate(self, descriptions: list[str], generator: str) -> tuple[list[LoraAdapter], float]:
        return await self._call(self.generator.generate, (generator, descriptions))

    async def adapt(self, descriptions: list[str], generator: str,
                    strategy: str | None) -> tuple[list[dict[str, Any]], list[LoraAdapter | None], float]:
        """(decisions, adapters, ms): the description strategy's choice per description (retriever/strategy.py)."""
        return await self._call(self.generator.adapt, (generator, descriptions, strategy))

    async def route(self, inputs: list[str], top_k: int) -> list[dict[str, Any]]:
        return await self._call(self.router.route, (inputs, top_k))

    def _llm(self, req: LLMRequest):
        main = req.main_adapter()
        return self.llm.options(multiplexed_model_id=main) if main else self.llm

    async def complete(self, req: LLMRequest) -> LLMResult:
        return await self._call(self._llm(req).generate, req)

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
    ephemeral: UnsavedStore  # unsaved generated adapters, on disk: every gateway replica sees them
    generator_trained: bool = True
    generator: str = "t2l"  # the default generator
    generators: tuple[str, ...] = ("t2l",)  # every generator the Generator deployment serves
    base_names: frozenset[str] = field(default_factory=frozenset)
    started: float = field(default_factory=time.time)
    base_norms: Any = None  # generator.sanity.BaseNorms of the base model, read on first use ({}: unknown)
    replica: str = ""  # this gateway replica's id, sent as the X-Hyperlora-Replica header
    startup: dict[str, float] = field(default_factory=dict)  # seconds per phase of this replica's start

    def check_adapter(self, adapter: LoraAdapter, what: str, param: str | None = None) -> None:
        """400 naming the limit when `adapter` is not fit to store or serve (generator.sanity)."""
        from generator.sanity import AdapterRejected, check_adapter

        if self.base_norms is None:
            self.base_norms = self._read_base_norms()
        try:
            check_adapter(adapter, self.cfg.adapter_limits, self.base_norms)
        except AdapterRejected as e:
            raise InvalidAdapter(f"{what} was refused: {e}", param=param) from e

    def _read_base_norms(self):
        from generator.models import resolve_base_model
        from generator.sanity import base_norms_from_dir

        try:
            norms = base_norms_from_dir(resolve_base_model(self.cfg.base_model), self.spec)
        except (OSError, ValueError) as e:
            logger.warning("cannot read the base weights' norms (%s): adapters are bounded by magnitude only", e)
            return {}
        if not norms:
            logger.warning("no safetensors base weights: adapters are bounded by factor magnitude only")
        return norms or {}

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

        eph = self.ephemeral.get(adapter_id, self.backends.share if self.backends else None)
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

    def instruction_of(self, adapter_id: str) -> str | None:
        """A library adapter's instruction (None when it has none or is gone)."""
        from retriever.library import AdapterNotFound, InvalidAdapterId

        try:
            return self.library.get(adapter_id).instruction
        except (AdapterNotFound, InvalidAdapterId):
            return None

    def strength_of(self, adapter_id: str) -> float | None:
        """An adapter's strength with in-context examples (None: full strength, or it is gone)."""
        from retriever.library import AdapterNotFound, InvalidAdapterId

        eph = self.ephemeral.get(adapter_id, self.backends.share if self.backends else None)
        if eph is not None:
            return eph.info.strength_with_examples
        try:
            return self.library.get(adapter_id).strength_with_examples
        except (AdapterNotFound, InvalidAdapterId):
            return None

    def new_ephemeral_id(self) -> str:
        return EPHEMERAL_PREFIX + uuid.uuid4().hex

    def remember(self, adapter: LoraAdapter, name: str, descriptions: list[str], samples: list[str]) -> AdapterInfo:
        """Keep an unsaved generated adapter where every gateway replica finds it (serve.unsaved); LLM replicas get
        it by reference."""
        from retriever.records import check_strength, now_iso

        adapter = adapter.to("cpu")
        info = AdapterInfo(id=self.new_ephemeral_id(), name=name, descriptions=descriptions, source="generated",
                           saved=False, base_model=self.model_name, rank=adapter.rank,
                           target_modules=list(adapter.target_modules), created=now_iso(), sample_inputs=samples,
                           instruction=adapter.metadata.get("instruction"),
                           strength_with_examples=check_strength(adapter.metadata.get("strength_with_examples")),
                           )
        self.ephemeral.put(adapter, info, self.backends.share)
        return info


