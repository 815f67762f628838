"""Shared fixtures: a tiny random Llama built in code, and the real embedded models (session-scoped)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def tiny_model():
    """A 2-layer random Llama with grouped-query attention (v_proj 32 -> 16), fresh per test."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_spec():
    from generator.spec import ModelSpec

    return ModelSpec.from_hf_config(tiny_llama_config(), "tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, spec) of the embedded SmolLM2-135M-Instruct; treat the model as read-only."""
    from generator.config import load_spec
    from generator.models import load_base_model

    model, tok = load_base_model()
    return model, tok, load_spec()


@pytest.fixture
def smollm2_copy(smollm2):
    """A private copy of SmolLM2 that a test may inject into."""
    model, tok, spec = smollm2
    return copy.deepcopy(model), tok, spec


@pytest.fixture(scope="session")
def encoder():
    from generator.encoder import TaskEncoder

    return TaskEncoder.load()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, spec) of the tiny Llama as the serving engine loads it (pristine: deep-copy to inject)."""
    from serve_fixtures import build_tiny_model

    from serve.engine import load_model

    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")))


def random_adapter(spec, targets=("q_proj", "v_proj"), rank=4, alpha=8.0, seed=0, scale=0.1):
    """A LoraAdapter with random A and B (B non-zero, so it changes the model)."""
    from generator.lora import LoraAdapter

    g = torch.Generator().manual_seed(seed)
    a = {m: scale * torch.randn(spec.n_layers, rank, spec.shapes[m][0], generator=g) for m in targets}
    b = {m: scale * torch.randn(spec.n_layers, spec.shapes[m][1], rank, generator=g) for m in targets}
    return LoraAdapter(spec.name, rank, alpha, a, b)
