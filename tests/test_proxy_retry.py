"""The proxy middleware (serve/proxy_retry.py) around a stand-in for Serve's proxy: a request whose replica died
before answering is sent again when repeating it is harmless, and the proxy's own text errors become JSON."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve.proxy_retry import ReplicaLossRetry, repeatable


class DyingProxy:
    """Like Serve's proxy when the replica dies: the first `deaths` calls return without sending anything."""

    def __init__(self, deaths: int, then: tuple[int, bytes, bytes] = (200, b"application/json", b'{"ok":true}')):
        self.deaths, self.then, self.bodies = deaths, then, []

    async def __call__(self, scope, receive, send):
        self.bodies.append((await receive())["body"])
        if len(self.bodies) <= self.deaths:
            return
        status, ctype, body = self.then
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})


def call(app, method: str, path: str, body: bytes = b"", chunks: int = 1):
    sent = []
    parts = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    asyncio.run(ReplicaLossRetry(app, wait_s=0.0)({"type": "http", "method": method, "path": path}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


@pytest.mark.parametrize("method,path,body,ok", [
    ("GET", "/v1/adapters/tmp-1", b"", True),
    ("DELETE", "/v1/adapters/abc", b"", True),
    ("POST", "/v1/completions", b'{"model": "base", "prompt": "x"}', True),
    ("POST", "/v1/adapters", b'{"description": "x"}', True),
    ("POST", "/v1/adapters", b'{"description": "x", "save": true}', False),
    ("POST", "/v1/adapters/upload", b"PK...", False),
    ("POST", "/v1/adapters", b"not json", True),
])
def test_what_is_sent_again(method, path, body, ok):
    assert repeatable(method, path, body) is ok


def test_a_request_whose_replica_died_is_sent_again_whole():
    app = DyingProxy(deaths=1)
    body = json.dumps({"model": "base", "prompt": "x" * 5000}).encode()
    status, headers, out = call(app, "POST", "/v1/completions", body, chunks=3)
    assert (status, out) == (200, b'{"ok":true}')
    assert app.bodies == [body, body]  # the second replica got the whole body, not what was left of it


def test_a_save_is_not_sent_again_and_gets_a_json_503():
    app = DyingProxy(deaths=1)
    status, headers, out = call(app, "POST", "/v1/adapters", b'{"description": "x", "save": true}')
    assert status == 503 and headers[b"content-type"] == b"application/json" and headers[b"retry-after"] == b"1"
    assert json.loads(out)["error"]["code"] == "replica_failed" and "GET /v1/adapters" in out.decode()
    assert len(app.bodies) == 1


def test_replicas_dying_every_time_get_a_json_503():
    status, headers, out = call(DyingProxy(deaths=99), "GET", "/healthz")
    assert status == 503 and json.loads(out)["error"]["code"] == "replica_failed"


@pytest.mark.parametrize("status", [500, 503, 408])
def test_the_proxys_own_text_errors_become_json(status):
    app = DyingProxy(deaths=0, then=(status, b"text/plain; charset=utf-8", b"Deployment is unavailable."))
    got, headers, out = call(app, "GET", "/v1/models")
    assert got == status and headers[b"content-type"] == b"application/json"
    assert json.loads(out)["error"]["message"] == "Deployment is unavailable."


def test_large_bodies_pass_through_once_and_untouched():
    app = DyingProxy(deaths=0, then=(201, b"application/json", b"{}"))
    body = b"x" * ((1 << 20) + 10)
    assert call(app, "POST", "/v1/adapters/upload", body, chunks=4)[0] == 201
    assert b"".join(app.bodies) != b"" and len(app.bodies) == 1
