"""The one prompt convention (generator.prompt), training samples built with it, the adapter's instruction
sidecar, and the quality report's harm and interval figures."""

from __future__ import annotations

import json
import random

import pytest
import torch

from generator.lora import LoraAdapter
from generator.peft_io import SIDECAR_NAME, AdapterFormatError, load_peft, save_peft
from generator.prompt import chat_messages, has_instruction, task_prompt, user_turn
from training.data import Example, Task, sample_pairs


class TemplateTokenizer:
    """The ChatML template SmolLM2 uses, without loading a tokenizer."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_instruction_goes_in_front_of_the_input_in_the_last_user_turn():
    assert user_turn("Classify the review.", "Great phone") == "Classify the review.\n\nGreat phone"
    assert user_turn(None, "Great phone") == user_turn("  ", "Great phone") == "Great phone"
    msgs = chat_messages("Say yes or no.", "Is water wet?", [("Is fire cold?", "no")], system="Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "Is fire cold?" and msgs[-1]["content"] == "Say yes or no.\n\nIs water wet?"
    text = task_prompt(TemplateTokenizer(), "Say yes or no.", "Is water wet?")
    assert text.endswith("<|im_start|>user\nSay yes or no.\n\nIs water wet?<|im_end|>\n<|im_start|>assistant\n")
    assert has_instruction("Say yes or no.\n\nIs water wet?", "Say yes or no.")
    assert not has_instruction("Is water wet?", "Say yes or no.") and not has_instruction("x", None)


def _task(name: str) -> Task:
    return Task(name=name, definition=f"Definition of {name}.", descriptions=[f"{name} paraphrase"],
                positive_examples=[Example(f"{name} shot {i}", [f"shot answer {i}"]) for i in range(2)],
                train=[Example(f"{name} input {i}", [f"answer {i}"]) for i in range(5)])


def test_training_pairs_carry_the_instruction_and_sometimes_examples():
    tok = TemplateTokenizer()
    tasks = [_task("a"), _task("b")]
    pairs = sample_pairs(tok, tasks, 300, random.Random(0))
    assert len(pairs) == 600
    for prompt, _ in pairs[:300]:
        assert "<|im_start|>user\nDefinition of a.\n\na input" in prompt  # definition by default, last turn
    with_shots = sum("shot answer" in p for p, _ in pairs) / len(pairs)
    assert 0.25 < with_shots < 0.42  # about a third of the samples get examples as earlier turns
    custom = sample_pairs(tok, tasks, 3, random.Random(0), instructions=["Do A.", "Do B."], example_rate=0.0)
    assert all("Do A.\n\na input" in p for p, _ in custom[:3]) and all("Do B.\n\nb input" in p for p, _ in custom[3:])
    assert not any("shot" in p for p, _ in custom)


def _adapter(metadata: dict) -> LoraAdapter:
    a = {"q_proj": torch.randn(2, 4, 8)}
    b = {"q_proj": torch.randn(2, 8, 4)}
    return LoraAdapter("tiny", 4, 8.0, a, b, metadata=metadata)


def test_adapter_carries_its_instruction_beside_the_peft_files(tmp_path):
    out = save_peft(_adapter({"instruction": "Classify the sentiment.", "generator": "t2l"}), tmp_path / "ad")
    assert json.loads((out / SIDECAR_NAME).read_text())["instruction"] == "Classify the sentiment."
    assert load_peft(out).metadata == {"instruction": "Classify the sentiment.", "generator": "t2l"}
    plain = save_peft(_adapter({}), tmp_path / "plain")
    assert not (plain / SIDECAR_NAME).exists() and load_peft(plain).metadata == {}


@pytest.mark.parametrize("content, why", [('["a list"]', "object of strings"), ('{"instruction": 3}', "object of "
                                          "strings"), ("{not json", "not valid JSON")])
def test_a_bad_sidecar_is_refused_with_the_reason(tmp_path, content, why):
    out = save_peft(_adapter({}), tmp_path / "ad")
    (out / SIDECAR_NAME).write_text(content)
    with pytest.raises(AdapterFormatError, match=why):
        load_peft(out)


def test_report_counts_harmed_tasks_against_the_same_prompt_without_adapter(tmp_path):
    from training.report import score

    records = []
    for i, (base, adapted) in enumerate([("yes", "yes"), ("yes", "no"), ("no", "no")]):
        for method, pred, adapter in (("base + instruction", base, False), ("t2l + instruction", adapted, True)):
            records.append({"method": method, "split": "dev", "task": f"t{i}", "input": "x", "prompt": "instruction",
                            "adapter": adapter, "prediction": pred, "references": ["yes"]})
    (tmp_path / "p.json").write_text(json.dumps({"records": records}))
    res = score(tmp_path / "p.json")["results"]["dev"]
    t2l = res["t2l + instruction"]
    assert t2l["reference"] == "base + instruction"
    assert t2l["harmed"] == ["t1"] and t2l["delta"] == {"t0": 0.0, "t1": -100.0, "t2": 0.0}
    lo, hi = res["base + instruction"]["rougeL_ci"]
    assert lo <= res["base + instruction"]["rougeL"] <= hi and 0.0 <= lo < hi <= 100.0


def test_quality_rows_include_the_recorded_strengths(tiny, tmp_path):
    """`eval quality` adds, beside a T2L checkpoint's full-strength rows, one row at each strength it recorded
    (without examples: `strength`; with 2 examples: `strength_with_examples`), its adapters scaled to it."""
    import torch
    from serve_fixtures import build_tiny_hypernet

    from generator.hypernet.checkpoint import load_checkpoint, save_checkpoint
    from training.data import Example, Task
    from training.evaluate import EvalConfig, build_rows

    _, tok, spec = tiny
    ck = build_tiny_hypernet(spec, tmp_path / "ck")
    net = load_checkpoint(ck, spec)
    net.cfg.extra = {"strength": 0.75, "strength_with_examples": 0.5}
    save_checkpoint(net, ck, dtype=torch.float32)
    tasks = [Task(f"t{i}", f"Do task {i}.", [f"task {i}"], [Example("a", ["b"]), Example("c", ["d"])],
                  test=[Example("x", ["y"])]) for i in range(2)]
    emb = {k: torch.randn(1, net.cfg.embed_dim) for t in tasks for k in (t.name, f"{t.name}::definition")}
    ecfg = EvalConfig(hypernets={"t2l": str(ck)}, baselines=False, example_strength=False)
    rows, _ = build_rows(ecfg, tok, spec, emb, tasks, [], "cpu")
    by = {(r.method, r.task): r for r in rows}
    assert {m for m, _ in by} == {"t2l + instruction", "t2l + instruction + 2 examples",
                                  "t2l [definition] + instruction", "t2l x0.75 + instruction",
                                  "t2l x0.5 + instruction + 2 examples"}
    full = by[("t2l + instruction", "t0")].adapter
    assert by[("t2l x0.75 + instruction", "t0")].adapter.alpha == 0.75 * full.alpha
    assert by[("t2l x0.75 + instruction", "t0")].prompt_kind == "instruction"
    assert by[("t2l x0.5 + instruction + 2 examples", "t1")].adapter.alpha == 0.5 * full.alpha
