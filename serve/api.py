"""The HTTP API: FastAPI routes over a `GatewayState`; errors always come back as JSON bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import completions, playground, upload_routes
from serve.errors import (
    Invalid,
    NotFound,
    ServiceError,
    UnknownAdapter,
    UnknownModel,
    as_service_error,
)
from serve.metrics import REGISTRY, render_prometheus
from serve.schemas import (
    AdapterInfo,
    AdapterList,
    DeletedAdapter,
    GenerateAdaptersRequest,
    GenerateAdaptersResponse,
    ModelCard,
    ModelList,
    RouteRequest,
    RouteResponse,
    RouteResult,
    errors,
)
from serve.state import GatewayState, IdempotencyKey, check_texts, idempotent_ids
from serve.upload_routes import UPLOAD_PATH
from serve.uploads import pack_dir

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, code: str, param: str | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "param": param, "code": code, **extra}},
                        status_code=status)


class BodyLimit:
    """ASGI middleware: a body over the limit is answered with 413, whether its length is declared or it comes
    chunked. The body is read here (up to the limit) and handed on whole, so no route sees a cut-off body."""

    def __init__(self, app, state: GatewayState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.state.cfg.limits
        limit = limits.max_upload_bytes if scope["path"].rstrip("/") == UPLOAD_PATH else limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(f"the request body is {int(declared)} bytes", limit)(scope, receive, send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await _too_large("the request body exceeds the limit", limit)(scope, receive, send)
            if not msg.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return whole.pop() if whole else await receive()

        return await self.app(scope, replay, send)


def _too_large(what: str, limit: int) -> JSONResponse:
    return error_response(413, f"{what}; the limit is {limit} bytes", "too_large", "body", limit=limit)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts, first = [], None
    # our own checks (value_error) say more than the "not a string" of the other branch of a union: first
    errors = sorted(errors, key=lambda e: e.get("type") != "value_error")
    for e in errors[:5]:  # union branches show up in `loc` as e.g. "function-after[...]" or "list[...]": dropped
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body" and "[" not in str(x))
        first = first or loc or None
        msg = "must hold some text, without control characters" if e.get("type") == "string_pattern_mismatch" \
            else e.get("msg", "invalid")
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts), first


def default_name(description: str) -> str:
    """A library name from a description: control characters become spaces, runs of space one, at most 200;
    "unnamed" when nothing is left (a description of control characters only)."""
    return " ".join("".join(c if ord(c) >= 32 else " " for c in description).split())[:200] or "unnamed"


def _allowed_methods(request: Request) -> list[str]:
    from starlette.routing import Match

    static: set[str] = set()  # routes without path parameters win, as in the schema: /v1/adapters/upload is
    methods: set[str] = set()  # not /v1/adapters/{adapter_id}
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE and getattr(route, "methods", None):
            (methods if getattr(route, "param_convertors", None) else static).update(route.methods)
    return sorted(static or methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()]
        for e in errors:
            e["loc"] = [x for x in e.get("loc", ()) if "[" not in str(x)]
        message, param = _validation_message(errors)
        body = jsonable_encoder({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                           "code": "invalid_value"}, "detail": errors})
        return JSONResponse(body, status_code=422)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8): like malformed JSON
            return error_response(422, f"the request body cannot be parsed ({exc.detail}); send UTF-8 JSON",
                                  "invalid_value", "body")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        resp = error_response(exc.status_code, str(exc.detail), code)
        resp.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first route of the path only: every route's methods
            resp.headers["Allow"] = ", ".join(_allowed_methods(request))
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        found = as_service_error(exc)
        if found is not None:
            return JSONResponse(found.body(), status_code=found.status)
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            return error_response(504, "a model deployment did not answer in time", "timeout")
        if _replica_lost(exc):
            logger.warning("%s %s: a model replica died on it twice: %s", request.method, request.url.path, exc)
            resp = error_response(503, "a model replica stopped while serving this request; Serve is restarting it: "
                                  "try again shortly", "unavailable")
            resp.headers["Retry-After"] = "5"
            return resp
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error (logged on the server)", "internal_error")


def _replica_lost(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import RayServeException

    return isinstance(exc, RayActorError) or (isinstance(exc, RayServeException)
                                              and isinstance(exc.__cause__, RayActorError))


def build_api(state: GatewayState, on_startup: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_startup is not None:
            await on_startup()
        yield

    app = FastAPI(title="hyperlora", version="0.1.0", lifespan=lifespan,
                  description="LoRA adapters from a sentence, a routed adapter library, and OpenAI-compatible "
                              "completions with per-request adapters or mixtures.")
    app.add_middleware(BodyLimit, state=state)
    if state.cfg.cors_origins:  # off unless configured: a web page of another origin gets no CORS grant
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.cfg.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "X-API-Key",
                                                                                  "Content-Type"])
    install_error_handlers(app)
    latency = REGISTRY.histogram("hyperlora_http_request_seconds", "Gateway request latency.",
                                 tag_keys=("route", "status"))

    @app.middleware("http")
    async def _timing(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        latency.observe(time.perf_counter() - t0, {"route": getattr(route, "path", "other"),
                                                   "status": str(response.status_code)})
        if state.replica:  # which gateway replica answered (several share the load; see serve/unsaved.py)
            response.headers["X-Hyperlora-Replica"] = state.replica
        return response

    _adapter_routes(app, state)
    upload_routes.add_routes(app, state)
    _other_routes(app, state)
    completions.add_routes(app, state)
    playground.add_routes(app)  # the page at `/` (serve/static/)
    return app


def _adapter_routes(app: FastAPI, state: GatewayState) -> None:
    @app.post("/v1/adapters", response_model=GenerateAdaptersResponse, tags=["adapters"],
              responses=errors(400, 401, 403, 404, 503))
    async def generate_adapters(body: GenerateAdaptersRequest, request: Request,
                                idempotency_key: str | None = IdempotencyKey) -> GenerateAdaptersResponse:
        """The best adapter per description (`strategy`: generate, retrieve or auto; see `decisions` for the path
        taken, the matched library tasks and the confidence); with `save`, generated ones are added to the library."""
        lim = state.cfg.limits
        texts = check_texts(body.texts, "description", lim.max_descriptions, lim.max_description_chars)
        kind = body.generator or state.generator
        if kind not in state.generators:
            raise NotFound(f"generator {kind[:32]!r} is not served here; available: {', '.join(state.generators)}",
                           param="generator")
        if body.save:
            state.authorize(request)
        decisions, adapters, ms = await state.backends.adapt(texts, kind, body.strategy)
        refused = next((d for d in decisions if d["rejected"]), None)
        if refused is not None:
            raise Invalid(f"out of scope: {refused['warning']} (confidence {refused['confidence']:.2f} is under the "
                          "service's reject_below)", param="description")
        for i, adapter in enumerate(adapters):
            if adapter is not None:  # generated or mixed here (a library adapter was checked when it was added)
                state.check_adapter(adapter, f"the adapter made for description #{i}", "description")
        infos = []
        ids = idempotent_ids(idempotency_key, len(texts))
        for text, adapter, decision, saved_id in zip(texts, adapters, decisions, ids, strict=True):
            name = body.name or default_name(text)
            if adapter is None:  # the library adapter, as is
                record = await asyncio.to_thread(state.library.get, decision["mixture"][0]["id"])
                infos.append(state.record_info(record))
            elif body.save:
                record = await asyncio.to_thread(_save, state, adapter, name, text, body.sample_inputs, saved_id)
                infos.append(state.record_info(record))
            else:
                infos.append(state.remember(adapter, name, [text], list(body.sample_inputs)))
        # only the default generator can be a fresh one: the others are served only from checkpoints
        trained = state.generator_trained or kind != state.generator
        return GenerateAdaptersResponse(adapters=infos, generation_ms=round(ms, 2), generator=kind,
                                        generator_trained=trained, decisions=decisions)

    @app.get("/v1/adapters", response_model=AdapterList, tags=["adapters"], responses=errors())
    async def list_adapters() -> AdapterList:
        """The library's adapters. Unsaved generated adapters are not listed (they belong to whoever made them);
        each is fetched and used by the id its generation returned."""
        records = await asyncio.to_thread(state.library.list)
        return AdapterList(data=[state.record_info(r) for r in records])

    @app.get("/v1/adapters/{adapter_id}", response_model=AdapterInfo, tags=["adapters"], responses=errors(400, 404))
    async def get_adapter(adapter_id: str) -> AdapterInfo:
        return state.lookup(adapter_id)[0]

    @app.get("/v1/adapters/{adapter_id}/download", tags=["adapters"],
             responses={200: {"content": {"application/gzip": {}, "application/zip": {}}}, **errors(400, 404)})
    async def download_adapter(adapter_id: str, format: Literal["tar.gz", "zip"] = Query("tar.gz")) -> Response:
        """The adapter as an archive of its PEFT directory (adapter_config.json + adapter_model.safetensors)."""
        info, _ = state.lookup(adapter_id)
        data = await asyncio.to_thread(_archive, state, info, format)
        media = "application/zip" if format == "zip" else "application/gzip"
        return Response(data, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{info.id}.{format}"'})

    @app.delete("/v1/adapters/{adapter_id}", response_model=DeletedAdapter, tags=["adapters"],
                responses=errors(400, 401, 403, 404))
    async def delete_adapter(adapter_id: str, request: Request) -> DeletedAdapter:
        state.authorize(request)
        info, _ = state.lookup(adapter_id)
        if not info.saved:
            state.ephemeral.remove(adapter_id)
        else:
            await asyncio.to_thread(state.library.remove, adapter_id)
        logger.info("deleted adapter %s (%s)", adapter_id, "library" if info.saved else "unsaved")
        return DeletedAdapter(id=adapter_id)


def _save(state: GatewayState, adapter, name: str, description: str, samples: list[str], adapter_id: str | None):
    try:
        return state.library.add(adapter, name, [description], "generated", samples, adapter_id)
    except ValueError as e:
        raise Invalid(str(e)) from e


def _archive(state: GatewayState, info: AdapterInfo, fmt: str) -> bytes:
    if info.saved:
        return pack_dir(state.library.path(info.id), info.id, fmt)
    eph = state.ephemeral.get(info.id)
    if eph is None:
        raise UnknownAdapter(f"adapter {info.id} was dropped (the unsaved store is full) or deleted", param="id")
    from generator.peft_io import save_peft  # torch: not at the Gateway's start

    tmp = Path(tempfile.mkdtemp(prefix="hyperlora-dl-"))
    try:
        save_peft(eph.adapter, tmp / info.id)
        return pack_dir(tmp / info.id, info.id, fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _other_routes(app: FastAPI, state: GatewayState) -> None:
    @app.post("/v1/route", response_model=RouteResponse, tags=["routing"], responses=errors(503))
    async def route(body: RouteRequest) -> RouteResponse:
        lim = state.cfg.limits
        texts = check_texts(body.texts, "input", lim.max_route_inputs, lim.max_prompt_chars)
        t0 = time.perf_counter()
        routes = await state.backends.route(texts, body.top_k)
        results = [RouteResult(index=i, abstain=r["abstain"], adapters=[
            {"id": a, "name": n, "score": round(s, 6), "weight": round(w, 6)}
            for a, n, s, w in zip(r["ids"], r["names"], r["scores"], r["weights"], strict=True)])
            for i, r in enumerate(routes)]
        return RouteResponse(routes=results, route_ms=round(1e3 * (time.perf_counter() - t0), 2))

    @app.get("/v1/models", response_model=ModelList, tags=["models"], responses=errors())
    async def models() -> ModelList:
        records = await asyncio.to_thread(state.library.list)
        created = int(state.started)
        cards = [ModelCard(id=state.model_name, kind="base", created=created),
                 ModelCard(id="auto", kind="router", created=created, name="route each request to library adapters")]
        cards += [ModelCard(id=r.id, name=r.name, created=created) for r in records]
        return ModelList(data=cards)

    @app.get("/v1/models/{model_id}", response_model=ModelCard, tags=["models"], responses=errors(404))
    async def get_model(model_id: str) -> ModelCard:
        """One model: the base model, `auto`, or an adapter id (unsaved ones too)."""
        created = int(state.started)
        if model_id in state.base_names:
            return ModelCard(id=state.model_name, kind="base", created=created)
        if model_id == "auto":
            return ModelCard(id="auto", kind="router", created=created, name="route each request to library adapters")
        try:
            info, _ = state.lookup(model_id)
        except UnknownAdapter:
            raise UnknownModel(f"no model {model_id[:80]!r} (see GET /v1/models)", param="model_id") from None
        return ModelCard(id=info.id, name=info.name, created=created)

    @app.get("/healthz", tags=["ops"], responses=errors(503))
    async def healthz() -> JSONResponse:
        try:
            info = await asyncio.wait_for(state.backends.info(), 10.0)
        except Exception as e:  # noqa: BLE001 - health reports any failure
            return error_response(503, f"a model deployment is not ready: {type(e).__name__}", "unavailable")
        return JSONResponse({"status": "ok", "base_model": state.model_name, "library_adapters": len(state.library),
                             "unsaved_adapters": len(state.ephemeral.ids()),
                             "uptime_s": round(time.time() - state.started, 1),
                             "generator_trained": info["generator"]["trained"],
                             "default_library": info["generator"].get("default_library"), **info,
                             "gateway": {"replica": state.replica, "startup": state.startup}})

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, responses=errors())
    async def metrics() -> PlainTextResponse:
        """Our counters and latency histograms in Prometheus text format (one replica of each deployment)."""
        snaps = [("gateway", REGISTRY.snapshot())] + await state.backends.snapshots()
        return PlainTextResponse(render_prometheus(snaps), media_type="text/plain; version=0.0.4")

