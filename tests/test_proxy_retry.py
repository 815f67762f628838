"""The proxy middleware (serve/proxy_retry.py) around a stand-in for Serve's proxy: a request whose replica died
before answering is sent again (one that stores an adapter with an idempotency key), and the proxy's own text errors
become JSON."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve.proxy_retry import ReplicaLossRetry, stores


class DyingProxy:
    """Like Serve's proxy when the replica dies: the first `deaths` calls return without sending anything."""

    def __init__(self, deaths: int, then: tuple[int, bytes, bytes] = (200, b"application/json", b'{"ok":true}')):
        self.deaths, self.then, self.bodies, self.keys = deaths, then, [], []

    async def __call__(self, scope, receive, send):
        self.bodies.append((await receive())["body"])
        self.keys.append(dict(scope["headers"]).get(b"idempotency-key"))
        if len(self.bodies) <= self.deaths:
            return
        status, ctype, body = self.then
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})


def call(app, method: str, path: str, body: bytes = b"", chunks: int = 1, headers=()):
    sent = []
    parts = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    asyncio.run(ReplicaLossRetry(app, wait_s=0.0)({"type": "http", "method": method, "path": path,
                                                  "headers": list(headers)}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


@pytest.mark.parametrize("method,path,body,stored", [
    ("GET", "/v1/adapters/tmp-1", b"", False),
    ("DELETE", "/v1/adapters/abc", b"", False),
    ("POST", "/v1/completions", b'{"model": "base", "prompt": "x"}', False),
    ("POST", "/v1/adapters", b'{"description": "x"}', False),
    ("POST", "/v1/adapters", b'{"description": "x", "save": true}', True),
    ("POST", "/v1/adapters/upload", b"PK...", True),
    ("POST", "/v1/adapters", b"not json", False),
])
def test_what_stores_an_adapter(method, path, body, stored):
    assert stores(method, path, body) is stored


def test_a_request_whose_replica_died_is_sent_again_whole():
    app = DyingProxy(deaths=1)
    body = json.dumps({"model": "base", "prompt": "x" * 5000}).encode()
    status, headers, out = call(app, "POST", "/v1/completions", body, chunks=3)
    assert (status, out) == (200, b'{"ok":true}')
    assert app.bodies == [body, body]  # the second replica got the whole body, not what was left of it


def test_a_save_is_sent_again_with_the_same_idempotency_key():
    app = DyingProxy(deaths=1)
    status, _, out = call(app, "POST", "/v1/adapters", b'{"description": "x", "save": true}')
    assert status == 200 and len(app.bodies) == 2
    assert app.keys[0] is not None and app.keys[0] == app.keys[1]  # added here, the same on both attempts
    app = DyingProxy(deaths=1)
    call(app, "POST", "/v1/adapters/upload", b"PK", headers=[(b"idempotency-key", b"mine")])
    assert app.keys == [b"mine", b"mine"]  # the client's own key is kept
    app = DyingProxy(deaths=0)
    call(app, "POST", "/v1/completions", b"{}")
    assert app.keys == [None]  # nothing stored: no key needed


def test_replicas_dying_every_time_get_a_json_503():
    status, headers, out = call(DyingProxy(deaths=99), "GET", "/healthz")
    assert status == 503 and json.loads(out)["error"]["code"] == "replica_failed"


@pytest.mark.parametrize("status", [500, 503, 408])
def test_the_proxys_own_text_errors_become_json(status):
    app = DyingProxy(deaths=0, then=(status, b"text/plain; charset=utf-8", b"Deployment is unavailable."))
    got, headers, out = call(app, "GET", "/v1/models")
    assert got == status and headers[b"content-type"] == b"application/json"
    assert json.loads(out)["error"]["message"] == "Deployment is unavailable."


def test_large_bodies_pass_through_once_and_a_lost_one_gets_a_json_503():
    app = DyingProxy(deaths=0, then=(201, b"application/json", b"{}"))
    body = b"x" * (3 << 20)
    assert call(app, "POST", "/v1/adapters/upload", body, chunks=6)[0] == 201
    assert len(app.bodies) == 1
    status, _, out = call(DyingProxy(deaths=1), "POST", "/v1/adapters/upload", body, chunks=6)
    assert status == 503 and "GET /v1/adapters" in json.loads(out)["error"]["message"]
