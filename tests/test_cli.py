"""`hyperlora generate` and `hyperlora info` through typer's CliRunner."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from generator.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft

FRESH_WARNING = "FRESHLY INITIALISED hypernetwork"


def flat(text: str) -> str:
    """Output with rich's error-box borders and line wrapping removed, for matching messages."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.fixture
def cli():
    from hyperlora import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


@pytest.fixture
def no_shipped_checkpoint(monkeypatch):
    """As on a clone without a trained checkpoint, whatever generator/checkpoints holds."""
    monkeypatch.setattr("generator.generate.default_checkpoint", lambda kind="t2l": None)


@pytest.fixture
def shared_encoder(monkeypatch, encoder):
    """Hand the session's MiniLM to the command instead of loading it again per invocation."""
    from generator.encoder import TaskEncoder

    monkeypatch.setattr(TaskEncoder, "load", classmethod(lambda cls, *args, **kwargs: encoder))
    return encoder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("generator.commands.build_generator", refuse)
    monkeypatch.setattr("generator.commands.load_spec", refuse)


@pytest.mark.parametrize("description", ["", "   "])
def test_generate_refuses_empty_description_before_loading(cli, no_model_loading, tmp_path, description):
    result = cli("generate", description, "--out", str(tmp_path / "ad"))
    assert result.exit_code != 0
    assert "empty or whitespace" in flat(result.output)
    assert not (tmp_path / "ad").exists()


def test_generate_refuses_missing_checkpoint(cli, no_model_loading, tmp_path):
    result = cli("generate", "Write limericks.", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert result.exit_code != 0
    assert "does not exist" in flat(result.output)


def test_generate_refuses_unknown_generator(cli, no_model_loading, tmp_path):
    result = cli("generate", "Write limericks.", "--generator", "magic", "--out", str(tmp_path / "a"))
    assert result.exit_code != 0
    assert "unknown generator 'magic'" in flat(result.output)


@pytest.mark.slow
def test_generate_writes_a_peft_dir_and_prints_the_time(cli, no_shipped_checkpoint, tmp_path):
    """The README command end to end: real SmolLM2 spec, real MiniLM, fresh hypernetwork (loudly)."""
    result = cli("generate", "Answer every question like a pirate.", "--out", str(tmp_path / "pirate"))
    assert result.exit_code == 0, result.output
    assert FRESH_WARNING in result.stderr
    assert re.search(r"generated a rank-8 LoRA on q_proj, v_proj \([\d,]+ params\) in [\d.]+ ms -> ", result.stdout)
    assert sorted(p.name for p in (tmp_path / "pirate").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "hyperlora.json"]
    assert load_peft(tmp_path / "pirate").metadata["instruction"] == "Answer every question like a pirate."
    cfg = json.loads((tmp_path / "pirate" / CONFIG_NAME).read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert load_peft(tmp_path / "pirate").b["v_proj"].shape == (30, 192, 8)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["L", "S"])
def test_generate_with_a_checkpoint_is_quiet(cli, shared_encoder, tmp_path, variant):
    from generator.config import load_spec
    from generator.hypernet.checkpoint import save_checkpoint
    from generator.hypernet.config import HypernetConfig
    from generator.hypernet.model import build_hypernet

    net = build_hypernet(HypernetConfig(spec=load_spec(), variant=variant, target_modules=("k_proj", "o_proj"),
                                        rank=4, embed_dim=shared_encoder.dim))
    save_checkpoint(net, tmp_path / "ck")
    result = cli("generate", "Summarise legal contracts.", "--checkpoint", str(tmp_path / "ck"),
                 "--out", str(tmp_path / "ad"))
    assert result.exit_code == 0, result.output
    assert FRESH_WARNING not in result.output
    assert "rank-4 LoRA on k_proj, o_proj" in result.stdout
    assert load_peft(tmp_path / "ad").target_modules == ("k_proj", "o_proj")


@pytest.mark.slow
def test_generate_refuses_a_checkpoint_for_another_model(cli, shared_encoder, tiny_spec, tmp_path):
    from generator.hypernet.checkpoint import save_checkpoint
    from generator.hypernet.config import HypernetConfig
    from generator.hypernet.model import build_hypernet

    save_checkpoint(build_hypernet(HypernetConfig(spec=tiny_spec, embed_dim=384, hidden_dim=32)), tmp_path / "ck")
    result = cli("generate", "Summarise legal contracts.", "--checkpoint", str(tmp_path / "ck"),
                 "--out", str(tmp_path / "ad"))
    assert result.exit_code != 0
    assert "tiny-llama" in flat(result.output) and "SmolLM2-135M-Instruct" in flat(result.output)
    assert not (tmp_path / "ad").exists()


@pytest.mark.slow
def test_info_prints_model_targets_size_and_params(cli, no_shipped_checkpoint, shared_encoder):
    from generator.config import load_spec
    from generator.generate import T2LGenerator

    result = cli("info")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "base model:      HuggingFaceTB/SmolLM2-135M-Instruct (30 layers)" in out
    assert re.search(r"target q_proj\s+d_in=576 d_out=576", out)
    assert re.search(r"target v_proj\s+d_in=576 d_out=192", out)
    n_lora = 30 * 8 * (576 + 576) + 30 * 8 * (576 + 192)
    assert f"adapter:         rank 8, alpha 16.0, {n_lora:,} params" in out
    net = T2LGenerator.fresh(load_spec(), shared_encoder).net
    assert f"{sum(p.numel() for p in net.parameters()):,} params, UNTRAINED (fresh init)" in out
    assert FRESH_WARNING in result.stderr


@pytest.mark.slow
def test_info_with_a_checkpoint(cli, shared_encoder, tmp_path):
    from generator.config import load_spec
    from generator.hypernet.checkpoint import save_checkpoint
    from generator.hypernet.config import HypernetConfig
    from generator.hypernet.model import build_hypernet

    net = build_hypernet(HypernetConfig(spec=load_spec(), variant="S", rank=2, embed_dim=384))
    save_checkpoint(net, tmp_path / "ck", dtype=torch.float32)
    result = cli("info", "--checkpoint", str(tmp_path / "ck"))
    assert result.exit_code == 0, result.output
    assert "variant S" in result.stdout and "trained" in result.stdout and FRESH_WARNING not in result.output
    assert f"{sum(p.numel() for p in net.parameters()):,} params" in result.stdout


def test_info_refuses_missing_checkpoint(cli, no_model_loading, tmp_path):
    result = cli("info", "--checkpoint", str(tmp_path / "nope"))
    assert result.exit_code != 0
    assert "does not exist" in flat(result.output)


@pytest.mark.slow
def test_bench_generate_prints_and_writes_json(cli, no_shipped_checkpoint, shared_encoder, tmp_path):
    from generator.config import load_spec
    from generator.generate import T2LGenerator

    out = tmp_path / "bench.json"
    result = cli("bench", "generate", "--repeats", "2", "--warmup", "0", "--batch-sizes", "1,32",
                 "--variants", "S,M", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert sorted(report["variants"]) == ["M", "S"]
    assert report["machine"]["torch_threads"] >= 1 and report["date"]
    for variant in ("M", "S"):
        entry = report["variants"][variant]
        net = T2LGenerator.fresh(load_spec(), shared_encoder, variant=variant).net
        params = sum(p.numel() for p in net.parameters())
        assert entry["params"] == params and entry["source"] == "fresh" and entry["rank"] == 8
        assert f"{variant}: {params:,} hypernet params" in result.stdout
        assert sorted(entry["latency_ms"]) == ["1", "32"] and isinstance(entry["meets_target"], bool)
        at32 = entry["latency_ms"]["32"]
        assert at32["p90"] >= at32["p50"] > 0 and at32["per_adapter_p50"] == pytest.approx(at32["p50"] / 32, abs=0.01)
    assert re.search(r"batch  32: p50 +[\d.]+ ms  p90 +[\d.]+ ms  per adapter p50 +[\d.]+ ms", result.stdout)


def test_bench_generate_refuses_unknown_variant(cli, tmp_path):
    result = cli("bench", "generate", "--variants", "XL", "--out", str(tmp_path / "b.json"))
    assert result.exit_code != 0
    assert "unknown variant(s) or batch size(s) ['XL']" in flat(result.output)
