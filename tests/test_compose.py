"""Fusion and per-sample composition on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter

from generator.apply import AdapterBank, LoraInjector
from generator.lora import LoraAdapter
from retriever.compose import COMPOSITIONS, build_composition, fuse
from retriever.router import Route

TARGETS = ("q_proj", "v_proj")


@pytest.fixture
def pair(tiny_spec):
    """Two adapters with different ranks, alphas and scalings (one rsLoRA)."""
    a = random_adapter(tiny_spec, rank=4, alpha=8.0, seed=1, scale=0.3)
    b = random_adapter(tiny_spec, rank=2, alpha=3.0, seed=2, scale=0.3)
    b.use_rslora = True
    return a, b


def logits(model, spec, lora_bank, index, weights, ids):
    injector = LoraInjector(model, spec, TARGETS)
    with torch.no_grad(), injector.use(lora_bank.gather(index, weights) if lora_bank else None):
        return model(ids).logits


def test_concat_fusion_is_the_weighted_sum_of_updates(pair):
    a, b = pair
    w = [0.3, -0.7]
    fused = fuse([a, b], w, "concat")
    assert fused.rank == 6 and fused.scaling == 1.0
    for m in TARGETS:
        for layer in range(a.n_layers):
            torch.testing.assert_close(fused.delta(m, layer), w[0] * a.delta(m, layer) + w[1] * b.delta(m, layer))


def test_concat_fusion_equals_the_mixture_output_wise(pair, tiny_model, tiny_spec):
    a, b = pair
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[0.25, 0.75], [0.25, 0.75]])
    bank = AdapterBank.from_adapters([a, b], tiny_spec)
    mixed = logits(tiny_model, tiny_spec, bank, torch.tensor([[0, 1]] * 2), w, ids)
    fused = fuse([a, b], [0.25, 0.75], "concat")
    one = AdapterBank.from_adapters([fused], tiny_spec)
    single = logits(tiny_model, tiny_spec, one, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), ids)
    base = logits(tiny_model, tiny_spec, None, None, None, ids)
    assert (mixed - base).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(single, mixed, atol=1e-5, rtol=1e-5)


def test_average_fusion_averages_the_factors(pair, tiny_spec):
    a, b = pair
    fused = fuse([a, b], [0.5, 0.5], "average")
    assert fused.rank == 4 and fused.scaling == 1.0
    torch.testing.assert_close(fused.a["q_proj"][:, :2], 0.5 * a.a["q_proj"][:, :2] + 0.5 * b.a["q_proj"])
    torch.testing.assert_close(fused.b["v_proj"][:, :, 2:], 0.5 * a.scaling * a.b["v_proj"][:, :, 2:])
    same = fuse([a, a], [0.5, 0.5], "average")
    torch.testing.assert_close(same.delta("q_proj", 1), a.delta("q_proj", 1))


def test_fusing_adapters_with_different_targets_uses_their_union(tiny_spec):
    q_only = random_adapter(tiny_spec, targets=("q_proj",), seed=3)
    qv = random_adapter(tiny_spec, targets=("q_proj", "v_proj"), seed=4)
    fused = fuse([q_only, qv], [1.0, 1.0], "concat")
    assert fused.target_modules == ("q_proj", "v_proj")
    torch.testing.assert_close(fused.delta("v_proj", 0), qv.delta("v_proj", 0))


@pytest.mark.parametrize("adapters, weights, method, message", [
    (0, [], "concat", "fuse needs at least one adapter"),
    (2, [1.0], "concat", "2 adapters but 1 weights"),
    (2, [1.0, float("nan")], "concat", "weights must be finite"),
    (2, [1.0, 1.0], "sum", "unknown fusion method 'sum'"),
])
def test_bad_fusions_are_refused(tiny_spec, adapters, weights, method, message):
    with pytest.raises(ValueError, match=message):
        fuse([random_adapter(tiny_spec, seed=i) for i in range(adapters)], weights, method)


def test_fusing_adapters_of_different_shapes_is_refused(tiny_spec):
    small = random_adapter(tiny_spec)
    other = LoraAdapter("x", 4, 8.0, {"q_proj": torch.zeros(2, 4, 48)}, {"q_proj": torch.zeros(2, 48, 4)})
    with pytest.raises(ValueError, match=r"adapter #1's q_proj is \(d_in, d_out\)=\(48, 48\)"):
        fuse([small, other], [1, 1])


def test_compositions_turn_routes_into_per_sample_adapters(pair, tiny_model, tiny_spec):
    a, b = pair
    store = {"a": a, "b": b}
    routes = [Route(["b", "a"], ["B", "A"], [0.9, 0.8], [0.6, 0.4], False),
              Route(["a"], ["A"], [0.7], [1.0], False),
              Route([], [], [], [], True)]
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    injector = LoraInjector(tiny_model, tiny_spec, TARGETS)

    def run(lora):
        with torch.no_grad(), injector.use(lora):
            return tiny_model(ids).logits

    base = run(None)
    out = {name: run(build_composition(name, tiny_spec).per_sample(routes, store.__getitem__)) for name in COMPOSITIONS}
    assert sorted(out) == ["fusion", "mixture", "selection"]

    def alone(adapter, row):
        return run(AdapterBank.from_adapters([adapter], tiny_spec).gather(torch.zeros(3, 1, dtype=torch.long)))[row]

    torch.testing.assert_close(out["selection"][0], alone(b, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["mixture"][0], alone(fuse([b, a], [0.6, 0.4], "concat"), 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["fusion"][0], alone(fuse([b, a], [0.6, 0.4], "average"), 0), atol=1e-5, rtol=1e-5)
    for name in COMPOSITIONS:  # a one-adapter route is that adapter; an empty route is the base model
        torch.testing.assert_close(out[name][1], alone(a, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[name][2], base[2], atol=1e-6, rtol=1e-6)
    assert build_composition("mixture", tiny_spec).per_sample([routes[2]], store.__getitem__) is None
    with pytest.raises(ValueError, match="unknown composition 'vote'"):
        build_composition("vote", tiny_spec)
