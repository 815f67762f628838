"""The PEFT directory format, both ways: what we write PEFT loads, what PEFT writes we load, same logits.

Also every malformed adapter directory is refused with an AdapterFormatError naming the problem.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import random_adapter, tiny_llama_config
from safetensors.torch import load_file, save_file

from generator.apply import AdapterBank, LoraInjector
from generator.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError, load_peft, save_peft
from generator.spec import ModelSpec

MLP_AND_KO = ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOL = 1e-4  # max abs logit difference allowed between PEFT and our path (fp32)


def peft_logits(model, adapter_dir, ids):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(ids).logits


def injector_logits(model, spec, adapter, ids):
    """Logits with `adapter` applied to every sample through LoraInjector (no PEFT involved)."""
    injector = LoraInjector(model, spec, adapter.target_modules)
    lora = AdapterBank.from_adapters([adapter], spec).gather(torch.zeros(ids.shape[0], dtype=torch.long))
    with torch.no_grad(), injector.use(lora):
        return model(ids).logits


def peft_made_adapter(model, out_dir, targets, rank, alpha, rslora, seed=0, b_std=0.2, **lora_kwargs):
    """Make an adapter the way a PEFT user does (get_peft_model, B set non-zero as if trained) and save it."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora, lora_dropout=0.0,
                     task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(b_std * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()


def peft_factors(peft_model):
    """PEFT's own LoRA tensors by (module, layer, 'A'|'B')."""
    pattern = re.compile(r"layers\.(\d+)\.\w+\.(\w+_proj)\.lora_(A|B)\.")
    out = {}
    for name, p in peft_model.named_parameters():
        m = pattern.search(name)
        if m:
            out[(m.group(2), int(m.group(1)), m.group(3))] = p.detach()
    assert out, "the PEFT model has no LoRA parameters"
    return out


def tiny_ids(batch=2, seq=7, seed=1):
    return torch.randint(0, tiny_llama_config().vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- our adapters -> PEFT ------------------------------------------------------------------------------------

CASES = [  # (targets, rank, alpha, rslora)
    (("q_proj", "v_proj"), 4, 8.0, False),
    (MLP_AND_KO, 2, 16.0, True),
    (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 3, 5.0, False),
]


@pytest.mark.parametrize("targets, rank, alpha, rslora", CASES)
def test_ours_to_peft_tiny(tiny_model, tiny_spec, tmp_path, targets, rank, alpha, rslora):
    adapter = random_adapter(tiny_spec, targets=targets, rank=rank, alpha=alpha)
    adapter.use_rslora = rslora
    save_peft(adapter, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["r"] == rank and cfg["use_rslora"] is rslora and sorted(cfg["target_modules"]) == sorted(targets)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    ids = tiny_ids()
    with torch.no_grad():
        base = tiny_model(ids).logits
    ours = injector_logits(copy.deepcopy(tiny_model), tiny_spec, adapter, ids)
    theirs = peft_logits(tiny_model, tmp_path / "ad", ids)
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the model
    assert (ours - theirs).abs().max() < TOL


def test_saved_tensors_use_peft_key_names(tiny_spec, tmp_path):
    adapter = random_adapter(tiny_spec, rank=4)
    state = load_file(str(save_peft(adapter, tmp_path / "ad") / WEIGHTS_NAME))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert torch.equal(state[key], adapter.b["v_proj"][1])
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert len(state) == 2 * 2 * 2  # 2 modules x 2 layers x (A, B)


def test_save_load_round_trip_and_overwrite(tiny_spec, tmp_path):
    first, second = random_adapter(tiny_spec, seed=1), random_adapter(tiny_spec, seed=2, rank=2, alpha=3.0)
    save_peft(first, tmp_path / "ad")
    save_peft(second, tmp_path / "ad")  # replaces the directory atomically
    back = load_peft(tmp_path / "ad", tiny_spec)
    assert (back.rank, back.alpha, back.base_model) == (2, 3.0, "tiny-llama")
    for m in second.a:
        assert torch.equal(back.a[m], second.a[m]) and torch.equal(back.b[m], second.b[m])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_save_in_half_precision(tiny_spec, tmp_path):
    adapter = random_adapter(tiny_spec)
    save_peft(adapter, tmp_path / "ad", dtype=torch.float16)
    assert load_file(str(tmp_path / "ad" / WEIGHTS_NAME))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float16
    back = load_peft(tmp_path / "ad", tiny_spec)
    assert back.a["q_proj"].dtype == torch.float32
    assert torch.allclose(back.a["q_proj"], adapter.a["q_proj"], atol=1e-3)


def test_save_refuses_non_finite(tiny_spec, tmp_path):
    adapter = random_adapter(tiny_spec)
    adapter.a["q_proj"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_peft(adapter, tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


# --- PEFT's adapters -> ours ---------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, rank, alpha, rslora", CASES)
def test_peft_to_ours_tiny(tiny_model, tiny_spec, tmp_path, targets, rank, alpha, rslora):
    ids = tiny_ids()
    ours_model = copy.deepcopy(tiny_model)
    peft_model = peft_made_adapter(tiny_model, tmp_path / "ad", targets, rank, alpha, rslora)
    with torch.no_grad():
        theirs = peft_model(ids).logits

    adapter = load_peft(tmp_path / "ad", tiny_spec)
    assert adapter.target_modules == tuple(m for m in adapter.target_modules if m in targets)
    assert set(adapter.target_modules) == set(targets)
    assert (adapter.rank, adapter.alpha, adapter.use_rslora) == (rank, alpha, rslora)
    for (m, i, ab), t in peft_factors(peft_model).items():
        assert torch.equal((adapter.a if ab == "A" else adapter.b)[m][i], t)
    ours = injector_logits(ours_model, tiny_spec, adapter, ids)
    assert (ours - theirs).abs().max() < TOL


def test_peft_adapter_on_some_layers_only(tiny_model, tiny_spec, tmp_path):
    """PEFT's layers_to_transform leaves other layers out of the file: they load as zeros, logits still agree."""
    ids = tiny_ids()
    ours_model = copy.deepcopy(tiny_model)
    peft_model = peft_made_adapter(tiny_model, tmp_path / "ad", ("q_proj", "v_proj"), 4, 8, False,
                                   layers_to_transform=[1])
    with torch.no_grad():
        theirs = peft_model(ids).logits
    adapter = load_peft(tmp_path / "ad", tiny_spec)
    assert adapter.n_layers == 2
    assert adapter.a["q_proj"][0].abs().sum() == 0 and adapter.b["q_proj"][1].abs().sum() > 0
    assert (injector_logits(ours_model, tiny_spec, adapter, ids) - theirs).abs().max() < TOL


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_round_trip_other_families(tmp_path, family):
    """Qwen2 (biased q/k/v) and Gemma (head_dim * heads != hidden) behave like Llama, both ways."""
    from test_spec import _configs
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _configs()[family]
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = ModelSpec.from_hf_config(config, f"tiny-{family}")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    adapter = random_adapter(spec, targets=("q_proj", "o_proj", "down_proj"), rank=2)
    save_peft(adapter, tmp_path / "ours")
    ours = injector_logits(copy.deepcopy(model), spec, adapter, ids)
    assert (ours - peft_logits(copy.deepcopy(model), tmp_path / "ours", ids)).abs().max() < TOL

    peft_model = peft_made_adapter(copy.deepcopy(model), tmp_path / "theirs", ("k_proj", "up_proj"), 4, 8, True)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    ours = injector_logits(copy.deepcopy(model), spec, load_peft(tmp_path / "theirs", spec), ids)
    assert (ours - theirs).abs().max() < TOL


# --- SmolLM2 -------------------------------------------------------------------------------------------------

def smollm2_ids(tok):
    texts = ["Translate to French: the cat sleeps on the mat.", "Summarise: LoRA adds low-rank updates."]
    tok.padding_side = "right"
    return tok(texts, return_tensors="pt", padding=True)["input_ids"][:, :10]


@pytest.mark.slow
def test_ours_to_peft_smollm2(smollm2, smollm2_copy, tmp_path):
    model, tok, spec = smollm2
    adapter = random_adapter(spec, targets=("q_proj", "v_proj"), rank=8, alpha=16.0, scale=0.02)
    save_peft(adapter, tmp_path / "ad")
    ids = smollm2_ids(tok)
    with torch.no_grad():
        base = model(ids).logits
    ours = injector_logits(copy.deepcopy(model), spec, adapter, ids)
    theirs = peft_logits(smollm2_copy[0], tmp_path / "ad", ids)
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.slow
def test_peft_to_ours_smollm2(smollm2, smollm2_copy, tmp_path):
    model, tok, spec = smollm2
    ids = smollm2_ids(tok)
    with torch.no_grad():
        base = model(ids).logits
    peft_model = peft_made_adapter(smollm2_copy[0], tmp_path / "ad", ("v_proj", "o_proj", "up_proj"), 4, 8, True,
                                   b_std=0.01)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (theirs - base).abs().max() > 1e-2
    adapter = load_peft(tmp_path / "ad", spec)
    assert adapter.b["v_proj"].shape == (30, 192, 4)  # grouped-query v_proj: 576 -> 192
    for (m, i, ab), t in peft_factors(peft_model).items():
        assert torch.equal((adapter.a if ab == "A" else adapter.b)[m][i], t)
    ours = injector_logits(copy.deepcopy(model), spec, adapter, ids)
    assert (ours - theirs).abs().max() < TOL


# --- malformed adapter directories ----------------------------------------------------------------------------

def _edit_config(d, **changes):
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    state = load_file(str(d / WEIGHTS_NAME))
    fn(state)
    save_file(state, str(d / WEIGHTS_NAME))


Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V1B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
Q5A = Q0A.replace(".0.", ".5.")  # the tiny model has layers 0 and 1 only
Q5B = Q5A.replace("lora_A", "lora_B")


def _set(key, value):
    def fn(state):
        state[key] = value(state[key]) if callable(value) else value
    return fn


BAD = {  # name -> (how to break a valid directory, what the message must say)
    "missing config": (lambda d: (d / CONFIG_NAME).unlink(), "adapter_config.json is missing"),
    "missing weights": (lambda d: (d / WEIGHTS_NAME).unlink(), "adapter_model.safetensors is missing"),
    "invalid json": (lambda d: (d / CONFIG_NAME).write_text("{'r': 4,"), "not valid JSON"),
    "json not an object": (lambda d: (d / CONFIG_NAME).write_text("[4]"), "JSON object"),
    "pickle file": (lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01."), "pickle"),
    "pickle instead of safetensors": (
        lambda d: ((d / WEIGHTS_NAME).rename(d / "adapter_model.pt")), "pickle"),
    "dora": (lambda d: _edit_config(d, use_dora=True), "use_dora"),
    "fan_in_fan_out": (lambda d: _edit_config(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "not lora": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING"), "only LORA"),
    "bad rank": (lambda d: _edit_config(d, r=0), "r must be a positive integer"),
    "rank pattern": (lambda d: _edit_config(d, rank_pattern={"q_proj": 2}), "rank_pattern"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "rank differs from config": (lambda d: _edit_config(d, r=2), r"expected \(2, 32\)"),
    "wrong shape": (lambda d: _edit_weights(d, _set(V1B, torch.zeros(17, 4))), r"lora_B \(17, 4\)"),
    "nan": (lambda d: _edit_weights(d, _set(Q0A, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))),
            "q_proj.lora_A holds NaN or Inf"),
    "inf": (lambda d: _edit_weights(d, _set(V1B, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))),
            "v_proj.lora_B holds NaN or Inf"),
    "unknown key": (lambda d: _edit_weights(d, _set("base_model.model.lm_head.weight", torch.zeros(2, 2))),
                    "unknown tensor key 'base_model.model.lm_head.weight'"),
    "dora magnitude key": (
        lambda d: _edit_weights(d, _set("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                        torch.ones(32))), "unknown tensor key"),
    "A without B": (lambda d: _edit_weights(d, lambda s: s.pop(V1B)), "needs both A and B"),
    "layer beyond the model": (
        lambda d: _edit_weights(d, lambda s: s.update({Q5A: torch.zeros(4, 32), Q5B: torch.zeros(32, 4)})),
        "layer 5 does not exist"),
    "empty weights": (lambda d: save_file({}, str(d / WEIGHTS_NAME)), "holds no LoRA tensors"),
    "garbage weights": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"not a safetensors file"), "not a readable"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_adapter_is_refused(tiny_spec, tmp_path, name):
    break_it, message = BAD[name]
    d = save_peft(random_adapter(tiny_spec, rank=4), tmp_path / "ad")
    break_it(d)
    with pytest.raises(AdapterFormatError, match=message):
        load_peft(d, tiny_spec)


def test_not_a_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match="is not a directory"):
        load_peft(tmp_path / "nowhere")


def test_adapter_for_another_model_is_refused(tiny_spec, tmp_path):
    from test_spec import _configs

    other = ModelSpec.from_hf_config(_configs()["mistral"], "tiny-mistral")  # 3 layers, v_proj 32 -> 8
    d = save_peft(random_adapter(tiny_spec), tmp_path / "ad")
    with pytest.raises(AdapterFormatError, match=r"v_proj: lora_A is \(4, 32\) and lora_B \(16, 4\), expected"):
        load_peft(d, other)
    wide = ModelSpec.from_hf_config(tiny_llama_config(), "wide")
    wide.shapes["q_proj"] = (48, 32)
    with pytest.raises(AdapterFormatError, match=r"q_proj: lora_A is \(4, 32\)"):
        load_peft(d, wide)


def test_adapter_pickles_as_numpy_without_its_batch():
    import pickle

    from generator.lora import LoraAdapter

    batch = torch.randn(16, 2, 4, 64)  # as a generator returns them: adapter i is a view of row i
    ad = LoraAdapter("m", 4, 8.0, {"q_proj": batch[3]}, {"q_proj": torch.randn(2, 64, 4).to(torch.bfloat16)},
                     metadata={"description": "d"})
    data = pickle.dumps(ad)
    assert len(data) < batch[3].numel() * 4 + 4096 + ad.b["q_proj"].numel() * 2  # the row, not the batch
    back = pickle.loads(data)
    assert torch.equal(back.a["q_proj"], ad.a["q_proj"]) and torch.equal(back.b["q_proj"], ad.b["q_proj"])
    assert back.b["q_proj"].dtype == torch.bfloat16 and back.metadata == {"description": "d"}
    back.a["q_proj"].add_(1.0)  # writable
