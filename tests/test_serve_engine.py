"""The batched multi-adapter engine without Ray, on the tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_adapter


def _adapter(spec, seed, rank=4, targets=("q_proj", "v_proj"), scale=0.3):
    return random_adapter(spec, targets, rank, alpha=2.0 * rank, seed=seed, scale=scale)


def _engine(tiny, **cfg):
    from serve.engine import EngineConfig, LLMEngine
    from serve.metrics import Registry

    model, tok, spec = tiny
    return LLMEngine(copy.deepcopy(model), tok, spec, EngineConfig(**{"max_new_tokens": 64, **cfg}), Registry())


PROMPTS = ["hello there", "the quick brown fox jumps", "one two three four five six", "a"]


def test_batched_distinct_adapters_match_one_at_a_time(tiny):
    from serve.engine import GenerationJob

    eng = _engine(tiny)
    spec = tiny[2]
    for i in range(3):
        eng.add_adapter(f"a{i}", _adapter(spec, i))
    mixes = [(("a0", 1.0),), (("a1", 1.0),), (), (("a2", 0.6), ("a0", 0.4))]
    jobs = [GenerationJob(eng.encode_prompt(p), mix, max_new_tokens=4 + 3 * i, ignore_eos=True)
            for i, (p, mix) in enumerate(zip(PROMPTS, mixes, strict=True))]
    together = eng.generate(jobs)
    alone = [eng.generate([j])[0] for j in jobs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.completion_tokens for r in together] == [4, 7, 10, 13]  # rows leave the batch as they finish
    plain = eng.generate([GenerationJob(jobs[0].prompt_ids, (), 4, ignore_eos=True)])[0]
    assert together[0].token_ids != plain.token_ids  # the adapter changes the output


def test_logits_match_peft_and_merged_mixture(tiny, tmp_path):
    """First-step logprobs of a single adapter equal PEFT's; a mixture equals merging the weighted deltas."""
    from peft import PeftModel

    from generator.peft_io import save_peft
    from serve.engine import GenerationJob

    model, tok, spec = tiny
    eng = _engine(tiny)
    ads = [_adapter(spec, 10), _adapter(spec, 11)]
    for i, ad in enumerate(ads):
        eng.add_adapter(f"m{i}", ad)
    ids = eng.encode_prompt(PROMPTS[1])
    one, mix = eng.generate([GenerationJob(ids, (("m0", 1.0),), 1, logprobs=5),
                             GenerationJob(ids, (("m0", 0.7), ("m1", 0.3)), 1, logprobs=5)])
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(save_peft(ads[0], tmp_path / "m0"))).eval()
    merged = copy.deepcopy(model)
    with torch.no_grad():
        ref_one = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        for i in range(spec.n_layers):
            for m in ("q_proj", "v_proj"):
                lin = merged.get_submodule(spec.module_path(i, m))
                lin.weight += 0.7 * ads[0].delta(m, i) + 0.3 * ads[1].delta(m, i)
        ref_mix = torch.log_softmax(merged(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    for res, ref in ((one, ref_one), (mix, ref_mix)):
        tok_id = int(ref.argmax())
        assert res.token_ids == [tok_id]
        assert abs(res.logprobs[0].logprob - float(ref[tok_id])) < 1e-4
        top = torch.topk(ref, 5)
        assert list(res.logprobs[0].top.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_stream_deltas_add_up_and_stop_strings(tiny):
    from serve.engine import GenerationJob

    eng = _engine(tiny)
    job = GenerationJob(eng.encode_prompt("hello"), (), max_new_tokens=12, ignore_eos=True)
    full = eng.generate([job])[0]
    streamed = "".join(d[0].text for d in eng.stream([job]) if d[0] is not None)
    assert streamed == full.text and full.finish_reason == "length" and full.completion_tokens == 12
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    if stop.strip():
        cut = eng.generate([GenerationJob(job.prompt_ids, (), 12, stop=(stop,))])[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
        assert "".join(d[0].text for d in eng.stream([GenerationJob(job.prompt_ids, (), 12, stop=(stop,))])
                       if d[0] is not None) == cut.text


def test_end_of_turn_token_stops(tiny):
    from serve.engine import GenerationJob

    eng = _engine(tiny)
    im_end = tiny[1].convert_tokens_to_ids("<|im_end|>")
    assert im_end in eng.stop_token_ids
    ids = eng.encode_prompt("hi")
    choose, steps = eng._choose, []

    def forced(logits, seqs):  # the model "says" <|im_end|> at its third token
        tokens = choose(logits, seqs)
        steps.append(1)
        if len(steps) == 3:
            tokens[:] = im_end
        return tokens

    eng._choose = forced
    res = eng.generate([GenerationJob(ids, (), 10)])[0]
    assert res.finish_reason == "stop" and res.token_ids[-1] == im_end and res.completion_tokens == 3
    assert "<|im_end|>" not in res.text


def test_sampling_is_seeded(tiny):
    from serve.engine import GenerationJob

    eng = _engine(tiny)
    ids = eng.encode_prompt("seed me")
    a, b, c = eng.generate([GenerationJob(ids, (), 8, temperature=1.0, seed=7, ignore_eos=True),
                            GenerationJob(ids, (), 8, temperature=1.0, seed=7, ignore_eos=True),
                            GenerationJob(ids, (), 8, temperature=1.0, top_p=0.5, seed=8, ignore_eos=True)])
    assert a.token_ids == b.token_ids and len(c.token_ids) == 8


def test_limits_and_unknown_adapters(tiny):
    from serve.engine import GenerationJob
    from serve.errors import InvalidAdapter, PromptTooLong, UnknownAdapter

    eng = _engine(tiny, max_prompt_tokens=8)
    with pytest.raises(PromptTooLong) as e:
        eng.encode_prompt("word " * 20)
    assert e.value.limit == 8 and e.value.status == 413
    with pytest.raises(UnknownAdapter):
        eng.generate([GenerationJob(eng.encode_prompt("hi"), (("missing", 1.0),), 2)])
    bad = _adapter(tiny[2], 1)
    bad.a["q_proj"][0, 0, 0] = float("inf")
    with pytest.raises(InvalidAdapter):
        eng.add_adapter("bad", bad)
    from generator.lora import LoraAdapter

    wrong = LoraAdapter("other", 2, 4.0, {"q_proj": torch.zeros(2, 2, 7)}, {"q_proj": torch.zeros(2, 32, 2)})
    with pytest.raises(InvalidAdapter, match="d_in"):
        eng.add_adapter("wrong", wrong)


def test_adapter_cache_is_lru_by_bytes(tiny):
    from serve.engine import AdapterCache
    from serve.metrics import Registry

    ad = _adapter(tiny[2], 0)
    cache = AdapterCache(max_bytes=ad.nbytes() * 2 + 10, device="cpu", dtype=torch.float32, registry=Registry())
    cache.put("a", ad)
    cache.put("b", ad)
    cache.get("a")  # a is now the most recent
    cache.put("c", ad)
    assert cache.keys() == ["a", "c"] and cache.nbytes == 2 * ad.nbytes()
    assert cache.remove("a") and "a" not in cache
    from serve.errors import InvalidAdapter

    with pytest.raises(InvalidAdapter):
        AdapterCache(10, "cpu", torch.float32, Registry()).put("x", ad)


def test_sequences_joining_mid_decode_match_one_at_a_time(tiny):
    """Continuous batching: rows added between steps (other lengths, adapters, base rows) decode as if alone."""
    from serve.decode import DecodeBatch
    from serve.engine import GenerationJob

    eng = _engine(tiny, max_batch_size=8)
    spec = tiny[2]
    eng.add_adapter("x", _adapter(spec, 21))
    eng.add_adapter("y", _adapter(spec, 22, targets=("q_proj", "k_proj", "v_proj"), rank=2))
    jobs = [GenerationJob(eng.encode_prompt(PROMPTS[0]), (("x", 1.0),), 6, ignore_eos=True),
            GenerationJob(eng.encode_prompt(PROMPTS[2]), (), 9, ignore_eos=True),
            GenerationJob(eng.encode_prompt(PROMPTS[1]), (("y", 0.5), ("x", 0.5)), 5, ignore_eos=True),
            GenerationJob(eng.encode_prompt(PROMPTS[3]), (("y", 1.0),), 4, ignore_eos=True)]
    alone = [eng.generate([j])[0].token_ids for j in jobs]
    batch = DecodeBatch(eng, detokenize=False)
    got: dict[int, list[int]] = {}
    ids = batch.add(jobs[:1])
    step = 0
    while not batch.done or step < 3:
        if step == 2:
            ids += batch.add(jobs[1:3])  # join while job 0 is mid-way
        if step == 4:
            ids += batch.add(jobs[3:])
        for j, d in batch.step():
            got.setdefault(j, []).extend(d.token_ids)
        step += 1
    assert [got[i] for i in ids] == alone
