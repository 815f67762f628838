"""The LLM deployment's continuous batching (its class run without Ray, tiny random Llama): decode steps run in
runs on the decode thread, handing deltas to the event loop as they come; a request arriving mid-run, even one
whose adapter must first be loaded on that thread, joins the running batch instead of waiting for it to end."""

from __future__ import annotations

import asyncio
import time

from conftest import random_adapter
from serve_fixtures import build_tiny_model, outside_serve, private_module


def _llm(tmp_path, monkeypatch, rows: int = 8, per_batch: int = 8):
    from serve.config import ServeConfig

    model_dir = build_tiny_model(tmp_path / "tiny-llama")
    cfg = ServeConfig(base_model=str(model_dir), library=str(tmp_path / "library"), default_library=False,
                      torch_threads=1, engine={"max_batch_size": rows, "max_new_tokens": 64},
                      llm_batch={"max_batch_size": per_batch, "batch_wait_timeout_s": 0.01})
    outside_serve(monkeypatch)
    import serve.deployments

    return private_module(monkeypatch, serve.deployments).LLM.func_or_class(cfg.model_dump())


def test_runs_of_steps_deliver_every_request_and_yield_to_newcomers(tmp_path, monkeypatch):
    from serve.protocol import LLMRequest

    llm = _llm(tmp_path, monkeypatch)
    late = random_adapter(llm.engine.spec, rank=4, alpha=8.0, seed=3, scale=0.3)
    runs, steps = [], []
    real_steps, real_new_batch = llm._steps, llm.engine.new_batch

    def counting_steps(*args):
        runs.append(1)
        return real_steps(*args)

    def counting_batch(*args, **kw):
        batch = real_new_batch(*args, **kw)
        step = batch.step
        batch.step = lambda: steps.append(1) or step()
        return batch

    monkeypatch.setattr(llm, "_steps", counting_steps)
    monkeypatch.setattr(llm.engine, "new_batch", counting_batch)

    def long(i: int) -> LLMRequest:
        return LLMRequest(prompt=f"a long answer {i}", max_new_tokens=48, ignore_eos=True)

    short = LLMRequest(prompt="a late short one", adapters=(("late", 1.0),), inline={"late": late},
                       max_new_tokens=2, ignore_eos=True)
    done: dict[str, float] = {}

    async def timed(name: str, req: LLMRequest):
        out = await llm.generate(req)
        done[name] = time.perf_counter()
        return out

    async def run():
        first = [asyncio.ensure_future(timed(f"long{i}", long(i))) for i in range(3)]
        while not steps:  # the batch is decoding
            await asyncio.sleep(0.005)
        together = await asyncio.gather(*first, timed("short", short))
        runs_together = len(runs)
        alone = [await llm.generate(long(i)) for i in range(3)] + [await llm.generate(short)]
        return together, runs_together, alone

    together, runs_together, alone = asyncio.run(run())
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [48, 48, 48, 2]
    assert done["short"] < min(done[f"long{i}"] for i in range(3))  # joined mid-batch, its adapter loaded between runs
    assert "late" in llm.engine.cache
    assert runs_together < len(steps) / 2  # far fewer hops to the decode thread than decode steps
    for r in together:  # each result says where its time went in the replica (the Gateway's Server-Timing)
        assert set(r.timings) == {"llm_prepare", "llm_queue", "llm_decode"} and min(r.timings.values()) >= 0
        assert r.timings["llm_decode"] > 0


def test_requests_each_in_its_own_batch_all_decode_together(tmp_path, monkeypatch):
    """Each request its own @serve.batch batch (as under a steady stream of clients): a batch holds its place until
    its last request finishes, so the number of batches open at once must not cap the rows decoding together below
    the engine's batch size (it was 8: the ninth client waited for the first to finish)."""
    from serve.protocol import LLMRequest

    llm = _llm(tmp_path, monkeypatch, rows=16, per_batch=1)
    most = [0]
    real_new_batch = llm.engine.new_batch

    def watched(*args, **kw):
        batch = real_new_batch(*args, **kw)
        step = batch.step
        batch.step = lambda: (most.__setitem__(0, max(most[0], batch.active)), step())[1]
        return batch

    monkeypatch.setattr(llm.engine, "new_batch", watched)

    async def run():  # 12 clients at once, each request its own batch (llm_batch.max_batch_size 1)
        return await asyncio.gather(*(llm.generate(LLMRequest(prompt=f"client {i}", max_new_tokens=40,
                                                              ignore_eos=True)) for i in range(12)))

    results = asyncio.run(run())
    assert [r.completion_tokens for r in results] == [40] * 12
    assert most[0] == 12
    assert max(r.timings["llm_queue"] for r in results) < min(r.timings["llm_decode"] for r in results)
