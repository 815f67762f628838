"""How the LLM deployment's requests travel through continuous batching: a `@serve.batch` batch is a `Group`
of `Queued` requests inside the running decode batch; each step hands every request its delta (or `Failed`, or
nothing yet). Imports only the engine's types and Ray Serve's request context."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import time
from typing import Any

from serve.engine_config import GenerationJob
from serve.protocol import LLMRequest
from serve.results import Delta


@dataclasses.dataclass
class Queued:
    job: GenerationJob
    request: LLMRequest
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)  # perf_counter when it was queued
    admitted_at: float | None = None  # when it joined the running decode batch


@dataclasses.dataclass
class Failed:
    error: BaseException


class Group:
    """One @serve.batch batch inside the running decode batch: every step it yields one entry per request."""

    def __init__(self, items: list[Queued], out: asyncio.Queue) -> None:
        self.items, self.out = items, out
        self.live: set[int] = set()  # positions still decoding
        self.failed: dict[int, BaseException] = {}  # positions that failed at admission, not yet reported
        self.closed = False

    def flush(self, deltas: dict[int, Delta]) -> bool:
        """Hand out one step (only if something happened); returns True once every request is finished."""
        if not deltas and not self.failed and self.live:
            return False
        step: list[Any] = []
        for pos in range(len(self.items)):
            if pos in deltas:
                step.append(deltas[pos])
                if deltas[pos].finish_reason is not None:
                    self.live.discard(pos)
            elif pos in self.failed:
                step.append(Failed(self.failed.pop(pos)))
            elif pos in self.live:  # decoding, nothing to hand out this step (a request that is not streamed)
                step.append(None)
            else:
                step.append(StopIteration)
        self.out.put_nowait(step)
        if not self.live:
            self.out.put_nowait(None)
            self.closed = True
        return self.closed

    def fail_all(self, error: BaseException) -> None:
        if not self.closed:
            self.out.put_nowait([Failed(error)] * len(self.items))
            self.out.put_nowait(None)
            self.closed = True


def enqueue_unsplit(batch_method, item):
    """Enqueue into a `@serve.batch` generator with the request's multiplexed model id cleared.

    Ray Serve 2.60 splits a batch by multiplexed model id, which would put every adapter in its own
    batch; our engine mixes adapters within one batch, so the id (set on the handle so that requests
    reach replicas holding their adapter) must not reach the batch queue.
    """
    try:
        from ray.serve import context as serve_context

        current = serve_context._get_serve_request_context()
        cleared = dataclasses.replace(current, multiplexed_model_id="")
    except (ImportError, AttributeError, TypeError):  # a Ray without these internals: batches still work
        return batch_method(item)

    def enqueue():
        serve_context._serve_request_context.set(cleared)
        return batch_method(item)

    return contextvars.copy_context().run(enqueue)


async def drain(steps) -> None:
    async for _ in steps:
        pass
