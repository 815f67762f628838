"""One bad request never hurts another: numerically safe sampling, and a row that cannot be sampled ends alone
(engine on the tiny random Llama, no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_adapter
from serve_fixtures import build_tiny_model, outside_serve, private_module


def _engine(tiny):
    from serve.engine import EngineConfig, LLMEngine
    from serve.metrics import Registry

    model, tok, spec = tiny
    return LLMEngine(copy.deepcopy(model), tok, spec, EngineConfig(max_new_tokens=16), Registry())


def _adapter(spec, seed, scale=0.3):
    return random_adapter(spec, rank=4, alpha=8.0, seed=seed, scale=scale)


def test_sampling_ranges_and_safe_rows():
    from serve.sampling import bad_rows, check_sampling, sample_row

    check_sampling(0.0, 1.0, None)
    check_sampling(0.7, 0.9, 2**64 - 1)
    for t, p, s, field in ((1e-40, 1.0, None, "temperature"), (3.0, 1.0, None, "temperature"),
                           (1.0, 0.0, None, "top_p"), (1.0, 1.5, None, "top_p"), (1.0, 1.0, 2**80, "seed")):
        with pytest.raises(ValueError, match=field):
            check_sampling(t, p, s)
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 1.0], [float("inf"), 0.0, 0.0],
                           [float("-inf")] * 3, [float("-inf"), 0.0, 5.0]])
    assert bad_rows(logits).tolist() == [False, True, True, True, False]
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([1.0, 3.0, 2.0, 50.0, -1e30])
    # a tiny top_p keeps the most likely token, a tiny temperature tends to greedy: neither can fail
    assert {sample_row(row, 1.0, 1e-300, g) for _ in range(5)} == {3}
    assert {sample_row(row, 1e-40, 1.0, g) for _ in range(5)} == {3}


def test_extreme_sampling_values_complete(tiny):
    """What the API refuses still cannot break the engine: tiny temperature / top_p and an 80-bit seed."""
    from serve.engine import GenerationJob

    eng = _engine(tiny)
    ids = eng.encode_prompt("hello there")
    greedy = eng.generate([GenerationJob(ids, (), 6, ignore_eos=True)])[0]
    jobs = [GenerationJob(ids, (), 6, temperature=1e-40, ignore_eos=True),
            GenerationJob(ids, (), 6, temperature=1.0, top_p=1e-300, ignore_eos=True),
            GenerationJob(ids, (), 6, temperature=1.0, seed=2**80, ignore_eos=True)]
    out = eng.generate(jobs)
    assert [r.finish_reason for r in out] == ["length"] * 3
    assert out[0].token_ids == greedy.token_ids and out[1].token_ids == greedy.token_ids


@pytest.mark.parametrize("poison_weight", [1.0, 0.01])
def test_one_poisoned_request_in_a_batch_of_eight(tiny, poison_weight):
    """A row whose adapter drives the logits to NaN/Inf ends with an error; its seven batch-mates decode exactly
    as they would alone (greedy and seeded sampling, with and without adapters)."""
    from serve.engine import GenerationJob

    eng = _engine(tiny)
    spec = tiny[2]
    eng.add_adapter("good", _adapter(spec, 1))
    poison = _adapter(spec, 2)
    for m in poison.a:
        poison.a[m].fill_(1e30)
        poison.b[m].fill_(1e30)
    eng.cache.put("poison", poison)  # past add_adapter's checks, as a weight-level bug would be
    prompts = ["hello there", "the quick brown fox", "one two three", "a", "good morning", "review: dull",
               "translate: cat", "zz top"]
    jobs = []
    for i, p in enumerate(prompts):
        mix = (("good", 1.0),) if i % 2 else ()
        if i == 3:
            mix = (("poison", 1.0),) if poison_weight == 1 else (("good", 1 - poison_weight), ("poison", poison_weight))
        jobs.append(GenerationJob(eng.encode_prompt(p), mix, 5 + i % 3, temperature=0.8 * (i % 3 == 2), seed=i,
                                  ignore_eos=True))
    together = eng.generate(jobs)
    assert len(together) == 8
    assert together[3].finish_reason == "error" and "not finite" in together[3].error
    alone = [eng.generate([j])[0] for i, j in enumerate(jobs) if i != 3]
    mates = [r for i, r in enumerate(together) if i != 3]
    assert [r.token_ids for r in mates] == [r.token_ids for r in alone]
    assert all(r.finish_reason == "length" and r.error is None for r in mates)


def test_poisoned_request_fails_alone_in_the_llm_deployment(tmp_path, monkeypatch):
    """The same through the LLM deployment's own batching (its class run without Ray): eight concurrent
    requests, one whose adapter poisons its row gets GenerationFailed (a 400), seven get their completions."""
    import asyncio

    from serve.config import ServeConfig
    from serve.errors import GenerationFailed
    from serve.protocol import LLMRequest

    model_dir = build_tiny_model(tmp_path / "tiny-llama")
    cfg = ServeConfig(base_model=str(model_dir), library=str(tmp_path / "library"), default_library=False,
                      torch_threads=1, engine={"max_batch_size": 8, "max_new_tokens": 8},
                      llm_batch={"max_batch_size": 8, "batch_wait_timeout_s": 0.2})
    outside_serve(monkeypatch)
    import serve.deployments

    llm = private_module(monkeypatch, serve.deployments).LLM.func_or_class(cfg.model_dump())
    spec = llm.engine.spec
    good = _adapter(spec, 1)
    poison = _adapter(spec, 2)
    for m in poison.a:
        poison.a[m].fill_(1e30)
        poison.b[m].fill_(1e30)
    llm.engine.cache.put("poison", poison)  # already cached: the request's inline copy is not checked again

    def request(i: int) -> LLMRequest:
        if i == 3:
            return LLMRequest(prompt="poisoned", adapters=(("poison", 1.0),), inline={"poison": poison},
                              max_new_tokens=4)
        mix = (("good", 1.0),) if i % 2 else ()
        return LLMRequest(prompt=f"prompt number {i}", adapters=mix, inline={"good": good} if mix else {},
                          max_new_tokens=4, temperature=0.7 * (i % 3 == 2), seed=i)

    async def run():
        together = await asyncio.gather(*(llm.generate(request(i)) for i in range(8)), return_exceptions=True)
        alone = [await llm.generate(request(i)) for i in range(8) if i != 3]
        return together, alone

    together, alone = asyncio.run(run())
    assert isinstance(together[3], GenerationFailed) and together[3].status == 400
    mates = [r for i, r in enumerate(together) if i != 3]
    assert all(not isinstance(r, BaseException) for r in mates), mates
    assert [r.text for r in mates] == [r.text for r in alone] and all(r.completion_tokens for r in mates)
