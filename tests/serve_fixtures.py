"""Builders for the service tests: a tiny random Llama with SmolLM2's tokenizer, a tiny hypernetwork
checkpoint and a small library, all on disk, and a `ServeConfig` pointing at them."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch

TASKS = {
    "french": ("Translate English sentences into French.",
               ["Translate to French: good morning", "How do you say 'thank you' in French?",
                "Translate into French: the cat is black"]),
    "sentiment": ("Classify the sentiment of a movie review as positive or negative.",
                  ["Review: I loved this film, wonderful acting.", "Review: boring and far too long.",
                   "Is this review positive or negative? Great soundtrack!"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(out: Path) -> Path:
    """A 2-layer random Llama whose vocabulary is SmolLM2's, saved with SmolLM2's tokenizer (chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from generator.models import resolve_base_model

    tok = AutoTokenizer.from_pretrained(resolve_base_model())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_hypernet(spec, out: Path) -> Path:
    from generator.hypernet.checkpoint import save_checkpoint
    from generator.hypernet.config import HypernetConfig
    from generator.hypernet.model import build_hypernet

    torch.manual_seed(0)
    cfg = HypernetConfig(spec=spec, variant="M", rank=4, alpha=8.0, task_dim=16, pos_dim=8, hidden_dim=32,
                         n_blocks=1, dropout=0.0)
    net = build_hypernet(cfg)
    with torch.no_grad():  # make generated B large enough to change the tiny model's logits
        net.gain.copy_(torch.tensor([1.0, 0.5]))
    return save_checkpoint(net, out, dtype=torch.float32)


def build_tiny_cvae(spec, out: Path) -> Path:
    """A fresh tiny CVAE checkpoint (rank 4, like the tiny hypernetwork) with B large enough to matter."""
    from generator.cvae.checkpoint import save_cvae
    from generator.cvae.config import CVAEConfig
    from generator.cvae.model import LoraCVAE

    torch.manual_seed(0)
    net = LoraCVAE(CVAEConfig.sized("tiny", spec=spec, rank=4, alpha=8.0, embed_dim=384))
    net.init_untrained_normaliser(b_std=0.5)
    return save_cvae(net, out, dtype=torch.float32)


def build_library(root: Path, spec, seed: int = 0):
    """A library with one random adapter per task in TASKS (keys: descriptions and sample inputs)."""
    from generator.lora import LoraAdapter
    from retriever.library import AdapterLibrary

    lib = AdapterLibrary(root, spec)
    g = torch.Generator().manual_seed(seed)
    for name, (desc, samples) in TASKS.items():
        a = {m: 0.3 * torch.randn(spec.n_layers, 4, spec.shapes[m][0], generator=g) for m in ("q_proj", "v_proj")}
        b = {m: 0.3 * torch.randn(spec.n_layers, spec.shapes[m][1], 4, generator=g) for m in ("q_proj", "v_proj")}
        lib.add(LoraAdapter(spec.name, 4, 8.0, a, b), name, [desc], "trained", samples)
    return lib


def tiny_service(tmp: Path, port: int):
    """(ServeConfig, spec) for a service on the tiny model, hypernetwork and library under `tmp`."""
    from generator.config import load_spec
    from serve.config import ServeConfig

    model_dir = build_tiny_model(tmp / "tiny-llama")
    spec = load_spec(str(model_dir))
    ckpt = build_tiny_hypernet(spec, tmp / "hypernet")
    cvae = build_tiny_cvae(spec, tmp / "cvae")
    build_library(tmp / "library", spec)
    small = {"ray_actor_options": {"num_cpus": 0}}
    cfg = ServeConfig(
        base_model=str(model_dir), checkpoint=str(ckpt), other_generators={"cvae": str(cvae)},
        library=str(tmp / "library"), default_library=False,
        retriever={"abstain_threshold": 0.3}, strategy={"reject_below": 0.01},
        # the tiny model's random weights are small: its random test adapters change them ~20x (SmolLM2: < 0.4x)
        adapter_limits={"max_relative_update": 100.0},
        engine={"max_batch_size": 16, "max_new_tokens": 64, "max_prompt_tokens": 256, "cache_bytes": 8 << 20},
        llm_batch={"max_batch_size": 16, "batch_wait_timeout_s": 0.05}, torch_threads=1,
        limits={"max_body_bytes": 64 << 10, "max_upload_bytes": 4 << 20, "max_description_chars": 500,
                "max_prompt_chars": 2000, "max_prompts": 4},
        host="127.0.0.1", port=port,
        deployments={"Gateway": small, "Generator": small, "Router": small, "LLM": small},
    )
    return cfg, spec


@contextlib.contextmanager
def running_service(cfg, port: int, api_key: str) -> Iterator[str]:
    """The app of `cfg` served on loopback `port` with `api_key` for the Gateway; yields its base URL once healthy,
    and shuts Serve (and Ray, if it started it) down after."""
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.proxy_retry import CALLBACK, CALLBACK_ENV

    os.environ.setdefault(CALLBACK_ENV, CALLBACK)  # as `hyperlora serve` does (a Ray started here inherits it)
    cfg.deployments["Gateway"].ray_actor_options = {"runtime_env": {"env_vars": {"HYPERLORA_API_KEY": api_key}},
                                                    "num_cpus": 0}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="hyperlora", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while httpx.get(f"{url}/healthz", timeout=30).status_code != 200:
        if time.time() > deadline:
            raise TimeoutError("the service did not become healthy in 120 s")
        time.sleep(0.5)
    try:
        yield url
    finally:
        serve.delete("hyperlora")
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def private_module(monkeypatch, module):
    """A private copy of a deployments module: running a deployment class in-process binds its @serve.batch queue
    to the class, which would then no longer pickle for the Serve app other tests build."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"_private_{module.__name__.replace('.', '_')}", module.__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)  # dataclasses look their module up while it loads
    spec.loader.exec_module(copy)
    return copy


def outside_serve(monkeypatch) -> None:
    """Let @serve.batch queues be made outside a replica (they ask the replica context for a limit)."""
    from types import SimpleNamespace

    from ray import serve

    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=256))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
