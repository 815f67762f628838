"""Per-sample adapter application (AdapterBank + LoraInjector) against PEFT and against merged weights."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import random_adapter, tiny_llama_config

from generator.apply import AdapterBank, LoraInjector, MultiLoraLinear, PerSampleLora
from generator.lora import zeros_like_spec
from generator.peft_io import save_peft

TOL = 1e-4


def three_adapters(spec):
    """Adapters of different ranks, alphas, scalings and target sets."""
    rs = random_adapter(spec, targets=("q_proj", "v_proj", "down_proj"), rank=2, alpha=4.0, seed=2)
    rs.use_rslora = True
    return [
        random_adapter(spec, targets=("q_proj", "v_proj"), rank=4, alpha=8.0, seed=1),
        rs,
        random_adapter(spec, targets=("k_proj", "up_proj"), rank=3, alpha=6.0, seed=3),
    ]


def union_targets(adapters):
    return sorted({m for ad in adapters for m in ad.target_modules})


def padded_batch(batch=4, seed=5):
    """Left-padded random token ids and their attention mask: sample i has i leading pad positions."""
    ids = torch.randint(1, tiny_llama_config().vocab_size, (batch, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, :i] = 0
    return ids, mask


def ours(model, spec, adapters, index, ids, mask=None, weights=None):
    injector = LoraInjector(model, spec, union_targets(adapters))
    lora = AdapterBank.from_adapters(adapters, spec).gather(index, weights)
    with torch.no_grad(), injector.use(lora):
        return model(input_ids=ids, attention_mask=mask).logits


def test_per_sample_adapters_equal_peft_one_at_a_time(tiny_model, tiny_spec, tmp_path):
    from peft import PeftModel

    adapters = three_adapters(tiny_spec)
    index = torch.tensor([2, 0, 1, 0])  # sample -> adapter
    ids, mask = padded_batch()
    got = ours(copy.deepcopy(tiny_model), tiny_spec, adapters, index, ids, mask)

    for k, ad in enumerate(adapters):
        save_peft(ad, tmp_path / f"a{k}")
    peft_model = PeftModel.from_pretrained(tiny_model, str(tmp_path / "a0"), adapter_name="a0").eval()
    for k in (1, 2):
        peft_model.load_adapter(str(tmp_path / f"a{k}"), adapter_name=f"a{k}")
    with torch.no_grad():
        for i, k in enumerate(index.tolist()):
            peft_model.set_adapter(f"a{k}")
            want = peft_model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0]
            keep = mask[i].bool()  # padded positions carry no meaning
            assert (got[i][keep] - want[keep]).abs().max() < TOL, f"sample {i} (adapter {k})"
        # PEFT's own mixed-batch inference agrees too
        mixed = peft_model(input_ids=ids, attention_mask=mask, adapter_names=[f"a{k}" for k in index.tolist()]).logits
    assert ((got - mixed).abs().amax(-1) * mask).max() < TOL


def test_different_adapters_give_different_outputs(tiny_model, tiny_spec):
    adapters = three_adapters(tiny_spec)
    ids = padded_batch(batch=1)[0].expand(3, -1)  # the same input three times
    got = ours(tiny_model, tiny_spec, adapters, torch.arange(3), ids)
    assert (got[0] - got[1]).abs().max() > 1e-2 and (got[1] - got[2]).abs().max() > 1e-2


def merged_logits(model, spec, adapters, index_row, weight_row, ids, mask):
    """The reference for a mixture: the base weights plus the weighted sum of the adapters' dense deltas."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for k, w in zip(index_row.tolist(), weight_row.tolist(), strict=True):
            ad = adapters[k]
            for m in ad.target_modules:
                for i in range(spec.n_layers):
                    merged.get_submodule(spec.module_path(i, m)).weight += w * ad.delta(m, i)
        return merged(input_ids=ids, attention_mask=mask).logits


def test_weighted_mixture_equals_weighted_sum_of_deltas(tiny_model, tiny_spec):
    adapters = three_adapters(tiny_spec)
    index = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    weights = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.7, -0.4, 0.9]])
    ids, mask = padded_batch(batch=3)
    got = ours(copy.deepcopy(tiny_model), tiny_spec, adapters, index, ids, mask, weights)
    for i in range(3):
        want = merged_logits(tiny_model, tiny_spec, adapters, index[i], weights[i], ids[i:i + 1], mask[i:i + 1])[0]
        keep = mask[i].bool()
        assert (got[i][keep] - want[keep]).abs().max() < TOL, f"sample {i}"


def test_default_mixture_weights_are_uniform(tiny_model, tiny_spec):
    adapters = three_adapters(tiny_spec)
    ids, mask = padded_batch(batch=2)
    index = torch.tensor([[0, 2], [1, 2]])
    model = copy.deepcopy(tiny_model)
    uniform = ours(model, tiny_spec, adapters, index, ids, mask)
    explicit = ours(model, tiny_spec, adapters, index, ids, mask, torch.full((2, 2), 0.5))
    assert torch.allclose(uniform, explicit)
    one = ours(model, tiny_spec, adapters, torch.tensor([1, 2]), ids, mask, torch.tensor([1.0, 1.0]))
    assert torch.allclose(one, ours(model, tiny_spec, adapters, torch.tensor([1, 2]), ids, mask))


def test_no_adapter_and_zero_adapter_leave_the_model_unchanged(tiny_model, tiny_spec):
    ids, mask = padded_batch()
    with torch.no_grad():
        base = tiny_model(input_ids=ids, attention_mask=mask).logits
    zero = zeros_like_spec(tiny_spec, ("q_proj", "v_proj"), rank=2, alpha=4.0)
    assert torch.equal(ours(tiny_model, tiny_spec, [zero], torch.zeros(4, dtype=torch.long), ids, mask), base)
    injector = LoraInjector(tiny_model, tiny_spec, ["q_proj", "v_proj"])
    with torch.no_grad(), injector.use(None):
        assert torch.equal(tiny_model(input_ids=ids, attention_mask=mask).logits, base)


def test_factors_are_cleared_after_use_even_on_error(tiny_model, tiny_spec):
    ids, _ = padded_batch(batch=2)
    with torch.no_grad():
        base = tiny_model(ids).logits
    adapter = random_adapter(tiny_spec)
    injector = LoraInjector(tiny_model, tiny_spec, adapter.target_modules)
    lora = AdapterBank.from_adapters([adapter], tiny_spec).gather(torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="boom"), injector.use(lora):
        raise RuntimeError("boom")
    assert all(layer.lora_a is None for layers in injector.layers.values() for layer in layers)
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, base)


def test_injecting_twice_wraps_once(tiny_model, tiny_spec):
    LoraInjector(tiny_model, tiny_spec, ["q_proj"])
    second = LoraInjector(tiny_model, tiny_spec, ["q_proj", "v_proj"])
    q = tiny_model.get_submodule(tiny_spec.module_path(0, "q_proj"))
    assert isinstance(q, MultiLoraLinear) and isinstance(q.base, torch.nn.Linear)
    assert second.layers["q_proj"][0] is q


def test_injector_refuses_adapters_on_modules_it_did_not_wrap(tiny_model, tiny_spec):
    injector = LoraInjector(tiny_model, tiny_spec, ["q_proj"])
    lora = AdapterBank.from_adapters([random_adapter(tiny_spec)], tiny_spec).gather(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("adapters target ['v_proj'] but only ['q_proj'] are injected")):
        with injector.use(lora):
            pass


def test_injector_refuses_a_spec_of_other_shapes(tiny_model, tiny_spec):
    from generator.spec import ModelSpec

    wrong = ModelSpec(tiny_spec.name, tiny_spec.n_layers, {**tiny_spec.shapes, "v_proj": (32, 32)})
    with pytest.raises(ValueError, match="v_proj is 32->16, spec says 32->32"):
        LoraInjector(tiny_model, wrong, ["v_proj"])


def test_bank_refuses_empty_and_misfit_adapters(tiny_spec):
    from test_spec import _configs

    from generator.spec import ModelSpec

    with pytest.raises(ValueError, match="at least one adapter"):
        AdapterBank.from_adapters([], tiny_spec)
    other = ModelSpec.from_hf_config(_configs()["mistral"], "tiny-mistral")
    with pytest.raises(ValueError, match="tiny-mistral"):
        AdapterBank.from_adapters([random_adapter(tiny_spec)], other)


def test_gather_shapes(tiny_spec):
    adapters = three_adapters(tiny_spec)
    bank = AdapterBank.from_adapters(adapters, tiny_spec)
    assert len(bank) == 3
    assert bank.a["q_proj"].shape == (3, 2, 4, 32)  # (n, L, max rank, d_in)
    lora = bank.gather(torch.tensor([[0, 1], [2, 2], [1, 0]]))
    assert isinstance(lora, PerSampleLora) and lora.batch_size == 3
    assert lora.a["v_proj"].shape == (2, 3, 8, 32)  # (L, batch, K * R, d_in)
    assert lora.b["v_proj"].shape == (2, 3, 16, 8)  # (L, batch, d_out, K * R)


def trainable_factors(spec, n, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = {m: (0.1 * torch.randn(n, spec.n_layers, rank, spec.shapes[m][0], generator=g)).requires_grad_()
         for m in ("q_proj", "v_proj")}
    b = {m: (0.1 * torch.randn(n, spec.n_layers, spec.shapes[m][1], rank, generator=g)).requires_grad_()
         for m in ("q_proj", "v_proj")}
    return a, b


def test_gradient_reaches_bank_factors_and_equals_peft(tiny_model, tiny_spec, tmp_path):
    from peft import PeftModel

    from generator.lora import LoraAdapter

    ids, mask = padded_batch(batch=2)
    a, b = trainable_factors(tiny_spec, n=3, rank=4)
    peft_base = copy.deepcopy(tiny_model)
    tiny_model.requires_grad_(False)
    injector = LoraInjector(tiny_model, tiny_spec, ["q_proj", "v_proj"])
    with injector.use(AdapterBank.from_factors(a, b, scaling=2.0).gather(torch.tensor([1, 1]))):
        loss = tiny_model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    for m in a:
        assert a[m].grad[1].abs().sum() > 0 and b[m].grad[1].abs().sum() > 0
        assert a[m].grad[[0, 2]].abs().sum() == 0 and b[m].grad[[0, 2]].abs().sum() == 0  # unused adapters

    # PEFT, trained on the same batch from the same factors, gets the same gradients
    adapter = LoraAdapter(tiny_spec.name, 4, 8.0, {m: t[1].detach() for m, t in a.items()},
                          {m: t[1].detach() for m, t in b.items()})  # alpha 8 / r 4 = scaling 2
    save_peft(adapter, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(peft_base, str(tmp_path / "ad"), is_trainable=True)
    peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert torch.allclose(loss, peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss, atol=1e-5)
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            layer, module = int(name.split(".layers.")[1].split(".")[0]), name.split(".lora_")[0].split(".")[-1]
            ours_grad = (a if ".lora_A." in name else b)[module].grad[1, layer]
            assert torch.allclose(ours_grad, p.grad, atol=1e-6), name


def test_gradient_reaches_adapters_through_from_adapters(tiny_model, tiny_spec):
    ad = random_adapter(tiny_spec, rank=2)
    for t in (*ad.a.values(), *ad.b.values()):
        t.requires_grad_()
    tiny_model.requires_grad_(False)
    injector = LoraInjector(tiny_model, tiny_spec, ad.target_modules)
    ids, _ = padded_batch(batch=2)
    with injector.use(AdapterBank.from_adapters([ad], tiny_spec).gather(torch.zeros(2, dtype=torch.long))):
        tiny_model(input_ids=ids, labels=ids).loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (*ad.a.values(), *ad.b.values()))
    assert all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.slow
def test_generate_text_with_per_sample_adapters(smollm2_copy):
    from generator.inference import generate_text
    from generator.prompt import task_prompt

    model, tok, spec = smollm2_copy
    prompts = [task_prompt(tok, None, "What is the capital of France?"),
               task_prompt(tok, "Name a colour.", "Answer in one word.", system="Be brief.")]
    plain = generate_text(model, tok, prompts, max_new_tokens=8)
    assert "Paris" in plain[0]
    injector = LoraInjector(model, spec, ["q_proj", "v_proj"])
    zero = zeros_like_spec(spec, ("q_proj", "v_proj"), rank=4, alpha=8.0)
    strong = random_adapter(spec, rank=4, scale=0.2)
    lora = AdapterBank.from_adapters([zero, strong], spec).gather(torch.tensor([0, 1]))
    mixed = generate_text(model, tok, prompts, injector, lora, max_new_tokens=8)
    assert mixed[0] == plain[0]  # the zero adapter is the identity
    assert mixed[1] != plain[1]  # the strong random one changes what sample 1 says
    with pytest.raises(ValueError, match="2 per-sample adapters for 1 prompts"):
        generate_text(model, tok, prompts[:1], injector, lora)
