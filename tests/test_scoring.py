"""Scoring known answers (generator.scoring): the strength a request's own examples choose for an adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from generator.apply import AdapterBank, LoraInjector
from generator.lora import LoraAdapter
from generator.scoring import Batcher, answer_losses, leave_one_out, strength_from_examples

INSTRUCTION = "Answer with the colour of the fruit."
EXAMPLES = [("banana", "yellow"), ("cherry", "red"), ("lime", "green")]


def fitted_adapter(model, tok, spec, injector, examples, steps=4, seed=0) -> LoraAdapter:
    """A rank-4 q/v LoRA trained on the leave-one-out prompts of `examples` (their answers, or others)."""
    torch.manual_seed(seed)
    targets = ("q_proj", "v_proj")
    a = {m: (0.1 * torch.randn(1, spec.n_layers, 4, spec.shapes[m][0])).requires_grad_() for m in targets}
    b = {m: torch.zeros(1, spec.n_layers, spec.shapes[m][1], 4, requires_grad=True) for m in targets}
    batch = Batcher(tok).batch(leave_one_out(tok, INSTRUCTION, examples), "cpu")
    opt = torch.optim.Adam([*a.values(), *b.values()], lr=1e-2)
    for _ in range(steps):
        with injector.use(AdapterBank.from_factors(a, b, 2.0).gather(torch.zeros(len(examples), dtype=torch.long))):
            loss = answer_losses(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return LoraAdapter(spec.name, 4, 8.0, {m: t[0].detach() for m, t in a.items()},
                       {m: t[0].detach() for m, t in b.items()})


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok, spec = tiny
    model = copy.deepcopy(model)
    injector = LoraInjector(model, spec, ("q_proj", "v_proj"))
    return model, tok, spec, injector


def test_leave_one_out_prompts_hold_the_other_examples_as_turns(setup):
    _, tok, _, _ = setup
    pairs = leave_one_out(tok, INSTRUCTION, EXAMPLES)
    assert [y for _, y in pairs] == ["yellow", "red", "green"]
    first = pairs[0][0]
    assert "cherry" in first and "lime" in first and "red" in first and first.count("banana") == 1
    assert first.rstrip().endswith("assistant") and INSTRUCTION in first


@pytest.mark.slow
def test_an_adapter_that_agrees_with_the_examples_keeps_its_weight_one_that_contradicts_them_steps_back(smollm2_copy):
    model, tok, spec = smollm2_copy
    model.requires_grad_(False)  # only the adapters train
    injector = LoraInjector(model, spec, ("q_proj", "v_proj"))
    agree = fitted_adapter(model, tok, spec, injector, EXAMPLES)
    contradict = fitted_adapter(model, tok, spec, injector, [(x, "purple") for x, _ in EXAMPLES])
    s, loss = strength_from_examples(model, tok, injector, spec, agree, INSTRUCTION, EXAMPLES)
    assert s >= 0.5 and loss[f"{s:g}"] < loss["0"] / 2
    s, loss = strength_from_examples(model, tok, injector, spec, contradict, INSTRUCTION, EXAMPLES)
    assert s == 0.0 and loss["0"] < loss["1"]
    assert list(loss) == ["0", "0.25", "0.5", "0.75", "1"]


def test_strength_from_examples_needs_two_examples(setup):
    model, tok, spec, injector = setup
    adapter = fitted_adapter(model, tok, spec, injector, EXAMPLES, steps=1)
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        strength_from_examples(model, tok, injector, spec, adapter, INSTRUCTION, EXAMPLES[:1])


def test_lcs_f1_is_rouge_l_on_words():
    from generator.scoring import lcs_f1

    assert lcs_f1("The cat sat", "the cat") == pytest.approx(0.8)  # LCS 2 of 3 and 2 words
    assert lcs_f1("yes", "Yes") == 1.0 and lcs_f1("no", "yes") == 0.0
    assert lcs_f1("", "") == 1.0 and lcs_f1("", "x") == 0.0


def test_gate_keeps_an_adapter_that_changes_nothing_and_needs_two_examples(setup):
    from generator.scoring import gate_from_examples

    model, tok, spec, injector = setup
    adapter = fitted_adapter(model, tok, spec, injector, EXAMPLES, steps=0)  # B = 0: the base model's answers
    keep, score = gate_from_examples(model, tok, injector, spec, adapter, INSTRUCTION, EXAMPLES, max_new_tokens=4)
    assert keep and score["adapter"] == score["base"]  # a tie keeps the adapter
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        gate_from_examples(model, tok, injector, spec, adapter, INSTRUCTION, EXAMPLES[:1])


@pytest.mark.slow
def test_gate_drops_an_adapter_whose_answers_contradict_the_examples(smollm2_copy):
    from generator.scoring import gate_from_examples

    model, tok, spec = smollm2_copy
    model.requires_grad_(False)
    injector = LoraInjector(model, spec, ("q_proj", "v_proj"))
    contradict = fitted_adapter(model, tok, spec, injector, [(x, "purple") for x, _ in EXAMPLES], steps=8)
    keep, score = gate_from_examples(model, tok, injector, spec, contradict, INSTRUCTION, EXAMPLES)
    assert not keep and score["base"] > score["adapter"]
    agree = fitted_adapter(model, tok, spec, injector, EXAMPLES)
    keep, score = gate_from_examples(model, tok, injector, spec, agree, INSTRUCTION, EXAMPLES)
    assert keep and score["adapter"] >= score["base"]
