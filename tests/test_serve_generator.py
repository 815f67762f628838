"""The Generator deployment's class run in-process (no Ray): the default library fills in the background while
requests are served, once, and a restart adds nothing twice."""

from __future__ import annotations

import asyncio
import time

from serve_fixtures import build_tiny_hypernet, build_tiny_model, outside_serve, private_module


def test_default_library_fills_in_the_background_once(tmp_path, monkeypatch):
    import serve.generator_deployment
    from generator.config import load_spec
    from retriever.library import AdapterLibrary
    from retriever.tasks import load_default_tasks
    from serve.config import ServeConfig

    model_dir = build_tiny_model(tmp_path / "tiny-llama")
    spec = load_spec(str(model_dir))
    cfg = ServeConfig(base_model=str(model_dir), checkpoint=str(build_tiny_hypernet(spec, tmp_path / "hypernet")),
                      other_generators={}, library=str(tmp_path / "library"), default_library=True, torch_threads=1)
    outside_serve(monkeypatch)
    module = private_module(monkeypatch, serve.generator_deployment)

    def start_and_wait():
        gen = module.Generator.func_or_class(cfg.model_dump())
        assert gen.library_fill["state"] in ("waiting", "ready")  # the fill waits until the service answers...
        asyncio.run(gen.info())  # ... which the gateway's first info call says
        adapters = gen._generate("t2l", ["Answer like a pirate."])  # served while the library may still fill
        deadline = time.time() + 600  # a guard against hanging, not a performance assertion
        while gen.library_fill["state"] in ("waiting", "filling") and time.time() < deadline:
            time.sleep(0.2)
        return gen, adapters

    gen, adapters = start_and_wait()
    assert len(adapters) == 1 and adapters[0].metadata["instruction"] == "Answer like a pirate."
    n_tasks = len(load_default_tasks())
    info = asyncio.run(gen.info())["default_library"]
    assert info["state"] == "ready" and info["adapters"] == n_tasks
    ids = {r.name: r.id for r in AdapterLibrary(cfg.library_root()).list()}
    assert len(ids) == n_tasks
    assert gen.strategy.library is not None  # built in the background meanwhile (its index keys the library)
    again, _ = start_and_wait()  # a restart: the set is there already
    assert again.library_fill["state"] == "ready" and again.library_fill["adapters"] == n_tasks
    assert {r.name: r.id for r in AdapterLibrary(cfg.library_root()).list()} == ids
    assert again.strategy.router.n_adapters == n_tasks
