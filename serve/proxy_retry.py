"""A middleware for Ray Serve's HTTP proxy: a request whose Gateway replica died before answering is sent again
(to another replica) when that is safe, and every error the proxy itself makes is answered as JSON.

Why: Serve's proxy answers a request whose replica died (kill -9, out of memory) with a bare `500 Internal Server
Error` in text, and its own 503/408 in text too; a client of a JSON API then sees one odd response per request in
flight, although another Gateway replica could have served it. Serve's router already avoids a replica it knows is
dead for new requests; this covers the requests that were inside it.

What is sent again: requests that change nothing when repeated (GET, HEAD, OPTIONS, DELETE of an id, completions,
routing, generating an adapter without saving it), and requests that store an adapter (`"save": true`, uploads)
because they carry an `Idempotency-Key`: this middleware adds one (a random one) when the client sent none, and
the Gateway derives the stored adapter's id from it, so the second attempt finds what the first stored (if it
got that far) instead of storing a copy (serve.state.idempotent_ids). An upload over `MAX_BODY` is not kept
for a second attempt: it gets a JSON 503 saying to check `GET /v1/adapters`.

Serve loads it in every proxy through `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_retry:middlewares`,
which `hyperlora serve` sets before starting Ray (for `serve run` / `serve deploy`, export it first).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

logger = logging.getLogger(__name__)
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.proxy_retry:middlewares"
ATTEMPTS = 3  # a request is tried at most this often (replica deaths in a row are rare)
RETRY_WAIT_S = 0.2  # between attempts: Serve's router drops the dead replica meanwhile
MAX_BODY = 1 << 20  # larger bodies (uploads) are streamed through once, never buffered for a retry
LOST_ONCE = ("the Gateway replica handling this request stopped before answering, and the request was too large to "
             "keep for a second attempt; if it stored an adapter, check GET /v1/adapters before sending it again")
UNSAFE = ("/v1/adapters/upload",)  # POSTs that store something whatever their body
IDEMPOTENCY_HEADER = b"idempotency-key"


def middlewares() -> list:
    """What Serve's proxy calls (through CALLBACK_ENV): the middlewares wrapped around it."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossRetry)]


def stores(method: str, path: str, body: bytes) -> bool:
    """Whether the request stores an adapter (sending it twice would store two without an idempotency key)."""
    if method != "POST":
        return False
    if path.rstrip("/") in UNSAFE:
        return True
    if path.rstrip("/") == "/v1/adapters":
        try:
            return json.loads(body).get("save") is True
        except (ValueError, AttributeError):
            return False  # not a JSON object: answered with a 422, nothing stored
    return False


def with_idempotency_key(scope: dict[str, Any]) -> dict[str, Any]:
    """`scope` with an Idempotency-Key header, a random one if it had none."""
    headers = list(scope.get("headers") or [])
    if any(k.lower() == IDEMPOTENCY_HEADER for k, _ in headers):
        return scope
    return {**scope, "headers": headers + [(IDEMPOTENCY_HEADER, uuid.uuid4().hex.encode())]}


def json_error(status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] = ()) -> list[dict[str, Any]]:
    body = json.dumps({"error": {"message": message, "type": code, "param": None, "code": code}}).encode()
    extra = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
             + extra},
            {"type": "http.response.body", "body": body}]


class ReplicaLossRetry:
    """ASGI middleware around Serve's HTTP proxy (see the module docstring)."""

    def __init__(self, app, attempts: int = ATTEMPTS, wait_s: float = RETRY_WAIT_S, max_body: int = MAX_BODY) -> None:
        self.app, self.attempts, self.wait_s, self.max_body = app, attempts, wait_s, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, rest = await self._read_body(receive)
        if rest is not None:  # too large to keep for a second attempt: sent once
            out = _JsonErrors(send)
            await self.app(scope, rest, out)
            if not out.started:
                await _send_all(send, json_error(503, LOST_ONCE, "replica_failed", [(b"retry-after", b"1")]))
            return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if stores(method, path, body):
            scope = with_idempotency_key(scope)
        for attempt in range(self.attempts):
            out = _JsonErrors(send)
            await self.app(scope, _prepend({"type": "http.request", "body": body, "more_body": False}, receive), out)
            if out.started:
                return
            logger.warning("%s %s: the Gateway replica stopped before answering (attempt %d of %d)", method, path,
                           attempt + 1, self.attempts)
            if attempt + 1 < self.attempts:
                await asyncio.sleep(self.wait_s)
        message = f"the Gateway replicas stopped before answering, {self.attempts} times; try again shortly"
        await _send_all(send, json_error(503, message, "replica_failed", [(b"retry-after", b"1")]))

    async def _read_body(self, receive):
        """(body, None), or (b"", a receive that replays what was read and streams the rest) past max_body."""
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return b"".join(chunks), None  # the client left; the app sees an empty body and the disconnect
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if not msg.get("more_body", False):
                return b"".join(chunks), None
            if seen > self.max_body:
                return b"", _prepend({"type": "http.request", "body": b"".join(chunks), "more_body": True}, receive)


async def _send_all(send, messages: list[dict[str, Any]]) -> None:
    for msg in messages:
        await send(msg)


def _prepend(first: dict[str, Any], receive):
    """A `receive` that gives `first`, then what `receive` gives (at the end: the client's disconnect)."""
    head = [first]

    async def rest():
        return head.pop() if head else await receive()

    return rest


class _JsonErrors:
    """A `send` that turns the proxy's own text errors (5xx, 408, 429: the Gateway answers JSON always) into JSON
    and notes whether a response was started."""

    def __init__(self, send) -> None:
        self.send, self.started = send, False
        self._held: dict[str, Any] | None = None
        self._text: list[bytes] = []

    async def __call__(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            self.started = True
            ctype = dict(msg.get("headers") or []).get(b"content-type", b"")
            if (msg["status"] >= 500 or msg["status"] in (408, 429)) and not ctype.startswith(b"application/json"):
                self._held = msg
                return
        elif msg["type"] == "http.response.body" and self._held is not None:
            self._text.append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            held, self._held = self._held, None
            text = b"".join(self._text).decode("utf-8", "replace").strip() or "the service could not answer"
            code = {408: "timeout", 429: "overloaded"}.get(held["status"], "unavailable")
            for m in json_error(held["status"], text[:500], code, list(held.get("headers") or [])):
                await self.send(m)
            return
        await self.send(msg)
