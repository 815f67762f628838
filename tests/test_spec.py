"""Model specs from HF configs, and the LoraAdapter type's own checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_adapter, tiny_llama_config

from generator.lora import LoraAdapter, zeros_like_spec
from generator.spec import DEFAULT_TARGETS, MODULE_PARENTS, ModelSpec, check_targets


def _configs():
    from transformers import GemmaConfig, MistralConfig, Qwen2Config

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
    return {
        "llama": tiny_llama_config(),
        "mistral": MistralConfig(**small, num_key_value_heads=1),
        "qwen2": Qwen2Config(**small, num_key_value_heads=2),
        "gemma": GemmaConfig(**small, num_key_value_heads=1, head_dim=16),  # head_dim * heads != hidden
    }


# family -> expected (d_in, d_out) of q, k, v, o, gate, up, down
SHAPES = {
    "llama": [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)],
    "mistral": [(32, 32), (32, 8), (32, 8), (32, 32), (32, 48), (32, 48), (48, 32)],
    "qwen2": [(32, 32), (32, 16), (32, 16), (32, 32), (32, 48), (32, 48), (48, 32)],
    "gemma": [(32, 64), (32, 16), (32, 16), (64, 32), (32, 48), (32, 48), (48, 32)],
}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_spec_shapes_match_the_built_model(family):
    """Shapes from the config alone equal those of the instantiated model's linears (GQA and head_dim included)."""
    from transformers import AutoModelForCausalLM

    config = _configs()[family]
    spec = ModelSpec.from_hf_config(config, family)
    assert [spec.shapes[m] for m in MODULE_PARENTS] == SHAPES[family]
    model = AutoModelForCausalLM.from_config(config)
    for m in MODULE_PARENTS:
        for i in range(spec.n_layers):
            linear = model.get_submodule(spec.module_path(i, m))
            assert (linear.in_features, linear.out_features) == spec.shapes[m]


@pytest.mark.parametrize("family", sorted(SHAPES))
@pytest.mark.parametrize("head_dim", ["saved", "dropped"])
def test_spec_from_config_json_agrees_with_autoconfig(tmp_path, family, head_dim):
    """config.json read as JSON gives AutoConfig's spec, or None (AutoConfig then) when a shape is left to the
    model class's defaults: Gemma without head_dim (it defaults to 256), any file without num_key_value_heads."""
    import json

    from generator.config import load_spec

    _configs()[family].save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    if head_dim == "dropped":
        raw.pop("head_dim", None)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    fast = ModelSpec.from_config_json(tmp_path / "config.json", str(tmp_path))
    reference = load_spec(str(tmp_path))  # JSON when it can, AutoConfig otherwise
    assert (fast is None) == (family == "gemma" and head_dim == "dropped")
    assert fast is None or fast == reference
    if head_dim == "saved":
        assert [reference.shapes[m] for m in MODULE_PARENTS] == SHAPES[family]
    raw.pop("num_key_value_heads")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ModelSpec.from_config_json(tmp_path / "config.json", "x") is None
    assert ModelSpec.from_config_json(tmp_path / "missing.json", "x") is None


def test_load_spec_of_a_saved_model_needs_no_transformers(tmp_path):
    """A service replica that only needs shapes (the Gateway) does not pay for importing transformers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny_llama_config().save_pretrained(tmp_path)
    code = ("import sys; from generator.config import load_spec; s = load_spec(sys.argv[1]); "
            "print(s.shapes['v_proj'], 'transformers' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)}).stdout
    assert out.split() == ["(32,", "16)", "False"]


@pytest.mark.slow
def test_smollm2_spec_has_grouped_query_v_proj():
    from generator.config import load_spec

    spec = load_spec()
    assert spec.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert spec.n_layers == 30
    assert spec.shapes["q_proj"] == (576, 576)
    assert spec.shapes["v_proj"] == (576, 192)


def test_check_targets_orders_and_refuses():
    assert check_targets(["v_proj", "q_proj"]) == DEFAULT_TARGETS
    assert check_targets(["down_proj", "k_proj", "up_proj"]) == ("k_proj", "up_proj", "down_proj")
    with pytest.raises(ValueError, match="empty"):
        check_targets([])
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['lm_head'\]"):
        check_targets(["q_proj", "lm_head"])


def test_spec_dict_round_trip_and_lora_params(tiny_spec):
    assert ModelSpec.from_dict(tiny_spec.to_dict()) == tiny_spec
    # q: 32 -> 32, v: 32 -> 16, 2 layers, rank 4
    assert tiny_spec.lora_params(["q_proj", "v_proj"], 4) == 2 * 4 * (64 + 48)


def test_mismatch_names_both_models(tiny_spec):
    other = ModelSpec.from_hf_config(_configs()["mistral"], "tiny-mistral")
    why = tiny_spec.mismatch(other, ["q_proj"])
    assert "tiny-mistral" in why and "tiny-llama" in why
    assert tiny_spec.mismatch(tiny_spec, list(MODULE_PARENTS)) is None


def test_adapter_scaling_plain_and_rslora(tiny_spec):
    ad = random_adapter(tiny_spec, rank=4, alpha=8.0)
    assert ad.scaling == 2.0
    ad.use_rslora = True
    assert ad.scaling == pytest.approx(8.0 / math.sqrt(4))
    assert torch.allclose(ad.delta("v_proj", 1), ad.scaling * ad.b["v_proj"][1] @ ad.a["v_proj"][1])
    assert ad.delta("v_proj", 1).shape == (16, 32)  # (d_out, d_in)


def test_adapter_size_and_targets(tiny_spec):
    ad = random_adapter(tiny_spec, targets=("v_proj", "q_proj"), rank=4)
    assert ad.target_modules == ("q_proj", "v_proj")
    assert ad.num_params() == tiny_spec.lora_params(["q_proj", "v_proj"], 4)
    assert ad.nbytes() == 4 * ad.num_params()
    assert ad.to(dtype=torch.float16).nbytes() == 2 * ad.num_params()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, b: (a, {**b, "q_proj": b["q_proj"][:, :, :3]}), "expected A"),  # B rank 3, A rank 4
        (lambda a, b: (a, {"q_proj": b["q_proj"]}), "B covers"),  # v_proj without B
        (lambda a, b: ({**a, "q_proj": a["q_proj"][0]}, b), "expected A"),  # A not stacked over layers
    ],
)
def test_adapter_refuses_inconsistent_factors(tiny_spec, change, message):
    good = random_adapter(tiny_spec, rank=4)
    a, b = change(dict(good.a), dict(good.b))
    with pytest.raises(ValueError, match=message):
        LoraAdapter("tiny-llama", 4, 8.0, a, b)


def test_adapter_refuses_rank_zero_and_unknown_module(tiny_spec):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraAdapter("x", 0, 1.0, {}, {})
    t = torch.zeros(2, 1, 32)
    with pytest.raises(ValueError, match="unknown target"):
        LoraAdapter("x", 1, 1.0, {"lm_head": t}, {"lm_head": torch.zeros(2, 32, 1)})


def test_check_fits_and_check_finite(tiny_spec):
    ad = random_adapter(tiny_spec)
    ad.check_fits(tiny_spec)
    other = ModelSpec.from_hf_config(_configs()["mistral"], "tiny-mistral")
    with pytest.raises(ValueError, match="tiny-mistral"):
        ad.check_fits(other)
    ad.b["v_proj"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="v_proj.lora_B holds NaN or Inf"):
        ad.check_finite()


def test_zero_adapter_is_the_identity(tiny_spec):
    ad = zeros_like_spec(tiny_spec, DEFAULT_TARGETS, rank=2, alpha=4.0)
    ad.check_fits(tiny_spec)
    assert all(ad.delta(m, i).abs().sum() == 0 for m in DEFAULT_TARGETS for i in range(tiny_spec.n_layers))
