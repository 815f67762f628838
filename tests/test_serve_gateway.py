"""The HTTP routes on a real `GatewayState` (library on disk, tiny base model's weights for the sanity bound)
with recording fakes for the model deployments, no Ray: what the LLM receives (instructions), what is refused
(sampling ranges, bad text, unsafe adapters, cross-site mutations, oversized chunked bodies) and the OpenAPI."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from serve_fixtures import build_tiny_model

INSTRUCTION = "Classify the sentiment of the review as positive or negative."


class RecordingBackends:
    """Stands in for the Generator, Router and LLM deployments; keeps every LLM request it gets."""

    def __init__(self, spec) -> None:
        self.spec, self.requests, self.routes = spec, [], {}

    def adapter(self, description: str | None = None, scale: float = 0.3, seed: int = 0):
        from generator.lora import LoraAdapter

        g = torch.Generator().manual_seed(seed)
        s = self.spec
        a = {m: scale * torch.randn(s.n_layers, 4, s.shapes[m][0], generator=g) for m in ("q_proj", "v_proj")}
        b = {m: scale * torch.randn(s.n_layers, s.shapes[m][1], 4, generator=g) for m in ("q_proj", "v_proj")}
        return LoraAdapter(s.name, 4, 8.0, a, b, metadata={"instruction": description} if description else {})

    async def generate(self, descriptions, generator):
        return [self.adapter(d) for d in descriptions], 1.0

    async def adapt(self, descriptions, generator, strategy):
        """The generate path of retriever/strategy.py for every description."""
        from retriever.strategy import Decision

        adapters, ms = await self.generate(descriptions, generator)
        for ad in adapters:
            ad.metadata["strength_with_examples"] = "0.75"  # as the shipped T2L checkpoint's adapters carry
        decisions = [Decision(strategy or "auto", "generate", [], [(None, 1.0)], 0.9, 0.8, "task", False).to_dict()
                     for _ in descriptions]
        return decisions, adapters, ms

    async def route(self, inputs, top_k):
        ids = list(self.routes)
        return [{"ids": ids, "names": ids, "scores": [0.9] * len(ids), "weights": list(self.routes.values()),
                 "abstain": not ids} for _ in inputs]

    async def complete(self, req):
        from serve.protocol import LLMResult

        self.requests.append(req)
        return LLMResult("ok", "stop", 3, 1, timings={"llm_prepare": 1.0, "llm_queue": 2.0, "llm_decode": 3.0})

    def share(self, adapter):
        return adapter

    async def info(self):
        return {"generator": {"trained": True}, "router": {}, "llm": {}}

    async def snapshots(self):
        return []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(state, backends, library, instructed adapter id, plain adapter id)."""
    from generator.config import load_spec
    from retriever.library import AdapterLibrary
    from serve.config import ServeConfig
    from serve.state import GatewayState
    from serve.unsaved import UnsavedStore

    tmp = tmp_path_factory.mktemp("gateway")
    model_dir = build_tiny_model(tmp / "tiny-llama")
    spec = load_spec(str(model_dir))
    cfg = ServeConfig(base_model=str(model_dir), library=str(tmp / "library"), default_library=False,
                      adapter_limits={"max_relative_update": 100.0},
                      limits={"max_body_bytes": 64 << 10, "max_upload_bytes": 1 << 20}, api_key_env="HL_TEST_KEY")
    backends = RecordingBackends(spec)
    library = AdapterLibrary(cfg.library_root(), spec)
    with_instr = library.add(backends.adapter(INSTRUCTION, seed=1), "sentiment", ["Sentiment."], "trained").id
    plain = library.add(backends.adapter(None, seed=2), "plain", ["No instruction."], "trained").id
    state = GatewayState(cfg=cfg, spec=spec, library=library, backends=backends,
                         ephemeral=UnsavedStore(cfg.unsaved_root(), 64 << 20),
                         base_names=frozenset({spec.name, "base"}))
    return state, backends, library, with_instr, plain


@pytest.fixture
def client(world):
    from fastapi.testclient import TestClient

    from serve.api import build_api

    os.environ.pop("HL_TEST_KEY", None)
    world[1].requests.clear()
    with TestClient(build_api(world[0])) as c:
        yield c


def _last(world):
    return world[1].requests[-1]


# ---- an adapter carries its instruction -------------------------------------------------------------


def test_completion_gets_the_adapters_instruction_in_the_chat_template(client, world):
    from generator.prompt import chat_messages

    _, _, _, aid, plain = world
    r = client.post("/v1/completions", json={"model": aid, "prompt": "I loved it.", "max_tokens": 2})
    assert r.status_code == 200, r.text
    req = _last(world)
    assert req.prompt is None and req.messages == chat_messages(INSTRUCTION, "I loved it.")
    assert req.messages[-1]["content"] == f"{INSTRUCTION}\n\nI loved it."
    assert r.json()["hyperlora"]["instruction"] == INSTRUCTION
    assert client.get(f"/v1/adapters/{aid}").json()["instruction"] == INSTRUCTION

    r = client.post("/v1/completions", json={"model": aid, "prompt": "I loved it.", "use_instruction": False})
    assert _last(world).prompt == "I loved it." and _last(world).messages is None
    assert r.json()["hyperlora"]["instruction"] is None

    client.post("/v1/completions", json={"model": aid, "prompt": f"{INSTRUCTION}\n\nDull."})  # not doubled
    assert _last(world).messages == chat_messages(None, f"{INSTRUCTION}\n\nDull.")
    client.post("/v1/completions", json={"model": plain, "prompt": "hi"})  # no instruction: raw, as before
    assert _last(world).prompt == "hi" and _last(world).messages is None


def test_completions_say_where_their_time_went_in_server_timing(client, world):
    from serve.bench_http import parse_server_timing

    for path, body in (("/v1/completions", {"model": world[3], "prompt": "I loved it.", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}]})):
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        parts = parse_server_timing(r.headers["server-timing"])
        assert set(parts) == {"gateway", "llm", "llm_prepare", "llm_queue", "llm_decode", "llm_transit"}
        assert (parts["llm_prepare"], parts["llm_queue"], parts["llm_decode"]) == (1.0, 2.0, 3.0)  # the LLM's own
        assert all(v >= 0 for v in parts.values())


def test_chat_gets_the_instruction_unless_it_has_a_system_message_or_it(client, world):
    aid = world[3]
    turns = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
             {"role": "user", "content": "Great film!"}]
    client.post("/v1/chat/completions", json={"model": aid, "messages": turns})
    sent = _last(world).messages
    assert sent[0]["content"] == "first" and sent[-1]["content"] == f"{INSTRUCTION}\n\nGreat film!"
    with_system = [{"role": "system", "content": "Be brief."}] + turns
    client.post("/v1/chat/completions", json={"model": aid, "messages": with_system})
    assert _last(world).messages == with_system
    own = [{"role": "user", "content": f"{INSTRUCTION}\n\nGreat film!"}]
    client.post("/v1/chat/completions", json={"model": aid, "messages": own})
    assert _last(world).messages == own
    client.post("/v1/chat/completions", json={"model": aid, "messages": turns, "use_instruction": False})
    assert _last(world).messages == turns


def test_mixtures_routes_and_generated_adapters_carry_instructions(client, world):
    _, backends, _, aid, plain = world
    mix = [{"id": plain, "weight": 0.7}, {"id": aid, "weight": 0.3}]  # the heaviest *with* an instruction
    r = client.post("/v1/completions", json={"model": "base", "prompt": "Nice.", "adapters": mix})
    assert _last(world).messages[-1]["content"] == f"{INSTRUCTION}\n\nNice."
    assert r.json()["hyperlora"]["instruction"] == INSTRUCTION
    backends.routes = {plain: 0.6, aid: 0.4}
    client.post("/v1/completions", json={"model": "auto", "prompt": "Nice."})
    assert _last(world).messages[-1]["content"] == f"{INSTRUCTION}\n\nNice."
    r = client.post("/v1/completions", json={"model": "base", "prompt": "2+2", "task_description": "Do arithmetic."})
    assert _last(world).messages[-1]["content"] == "Do arithmetic.\n\n2+2"
    gen = client.post("/v1/adapters", json={"description": "Answer like a pirate."}).json()["adapters"][0]
    assert gen["instruction"] == "Answer like a pirate."
    client.post("/v1/completions", json={"model": gen["id"], "prompt": "Hello"})
    assert _last(world).messages[-1]["content"] == "Answer like a pirate.\n\nHello"


def test_chat_with_example_turns_uses_a_generated_adapter_at_its_strength_with_examples(client, world):
    gen = client.post("/v1/adapters", json={"description": "Answer like a pirate."}).json()["adapters"][0]
    assert gen["strength_with_examples"] == 0.75
    plain = [{"role": "user", "content": "Hello"}]
    shots = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}] + plain
    r = client.post("/v1/chat/completions", json={"model": gen["id"], "messages": plain})
    assert _last(world).adapters == ((gen["id"], 1.0),) and r.json()["hyperlora"]["adapters"][0]["weight"] == 1.0
    r = client.post("/v1/chat/completions", json={"model": gen["id"], "messages": shots})
    assert _last(world).adapters == ((gen["id"], 0.75),)  # examples in the prompt: the chosen strength
    assert r.json()["hyperlora"]["adapters"] == [{"id": gen["id"], "weight": 0.75}]
    aid = world[3]  # a library adapter without a strength keeps full strength
    client.post("/v1/chat/completions", json={"model": aid, "messages": shots})
    assert _last(world).adapters == ((aid, 1.0),)


# ---- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "base", "prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"model": "base", "prompt": "x", "temperature": True}, "temperature"),
    ("/v1/completions", {"model": "base", "prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"model": "base", "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "base", "prompt": "x", "seed": 2**80}, "seed"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "seed": -(2**70)},
     "seed"),
])
def test_sampling_values_out_of_range_are_422_naming_the_field(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/adapters", b'{"description": "bad \\ud800"}', "description"),
    ("/v1/completions", b'{"model": "base", "prompt": "bad \\udc00 text"}', "prompt"),
    ("/v1/completions", b'{"model": "base", "prompt": ["ok", "\\ud800"]}', "prompt.1"),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages.0.content"),
    ("/v1/route", b'{"input": "\\udfff"}', "input"),
])
def test_lone_surrogates_are_422_naming_the_field(client, path, raw, param):
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


def test_chunked_body_over_the_limit_is_413(client, world):
    limit = world[0].cfg.limits.max_body_bytes

    def chunks():
        yield b'{"input": "'
        for _ in range(limit // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'

    r = client.post("/v1/route", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["limit"] == limit


def test_405_carries_allow_and_models_by_id(client, world):
    r = client.put("/v1/adapters")
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    r = client.options("/v1/adapters/upload")  # a static path is not /v1/adapters/{id}: as the schema says it
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    aid = world[3]
    assert client.get(f"/v1/models/{aid}").json()["id"] == aid
    assert client.get("/v1/models/base").json()["kind"] == "base"
    assert client.get("/v1/models/auto").json()["kind"] == "router"
    assert client.get("/v1/models/nope").status_code == 404
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    assert oc.models.retrieve(aid).id == aid  # what the official client calls


def test_openapi_declares_errors_and_one_of(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/models/{model_id}" in spec["paths"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert {"413", "422", "500"} <= set(op["responses"]), (method, path)
    comp = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "404", "503"} <= set(comp)
    schemas = spec["components"]["schemas"]
    assert "oneOf" in schemas["GenerateAdaptersRequest"] and "oneOf" in schemas["RouteRequest"]


# ---- adapters in: sanity on every way ----------------------------------------------------------------


def _archive(adapter, tmp: Path, sidecar: dict | None = None, dtype=None) -> bytes:
    from safetensors.torch import save_file

    from generator.peft_io import WEIGHTS_NAME, adapter_state_dict, save_peft

    d = save_peft(adapter, tmp / "peft")
    if dtype is not None:
        save_file({k: v.to(dtype) for k, v in adapter_state_dict(adapter).items()}, str(d / WEIGHTS_NAME))
    if sidecar is not None:
        (d / "hyperlora.json").write_text(json.dumps(sidecar))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for p in d.iterdir():
            tf.add(p, arcname=f"adapter/{p.name}")
    return buf.getvalue()


def _upload(client, data: bytes, **params):
    return client.post("/v1/adapters/upload", content=data, params={"description": "Uploaded.", **params},
                       headers={"Content-Type": "application/octet-stream"})


@pytest.mark.parametrize("case,reason", [("int32", "floating point"), ("huge", "max_factor_abs"),
                                         ("strong", "max_relative_update"), ("nan", "NaN")])
def test_upload_refuses_insane_adapters(client, world, tmp_path, case, reason):
    """int32 weights, finite but huge factors (1e30 passes every NaN/Inf check), an update that swamps the base
    weights, NaN: each a 400 that names the limit."""
    backends = world[1]
    adapter = backends.adapter(scale={"huge": 1e30, "strong": 30.0}.get(case, 0.3))
    if case == "nan":
        adapter.b["q_proj"][0, 0, 0] = float("nan")
        data = _nan_archive(adapter, tmp_path)  # save_peft refuses NaN: written by hand
    else:
        data = _archive(adapter, tmp_path, dtype=torch.int32 if case == "int32" else None)
    r = _upload(client, data)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"]


def _nan_archive(adapter, tmp: Path) -> bytes:
    from safetensors.torch import save_file

    from generator.peft_io import WEIGHTS_NAME, adapter_config, adapter_state_dict

    d = tmp / "nan"
    d.mkdir()
    save_file(adapter_state_dict(adapter), str(d / WEIGHTS_NAME))
    (d / "adapter_config.json").write_text(json.dumps(adapter_config(adapter)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for p in d.iterdir():
            tf.add(p, arcname=p.name)
    return buf.getvalue()


def test_uploaded_instruction_is_kept_and_served(client, world, tmp_path):
    backends = world[1]
    r = _upload(client, _archive(backends.adapter(), tmp_path / "a", sidecar={"instruction": "Say yes or no."}))
    assert r.status_code == 201, r.text
    assert r.json()["instruction"] == "Say yes or no."
    r2 = _upload(client, _archive(backends.adapter(), tmp_path / "b"), instruction="Answer in French.")
    client.post("/v1/completions", json={"model": r2.json()["id"], "prompt": "Bonjour"})
    assert _last(world).messages[-1]["content"] == "Answer in French.\n\nBonjour"


def test_library_load_checks_sanity(world):
    """The LLM deployment's way in (library -> engine) goes through the same check."""
    from generator.models import resolve_base_model
    from generator.sanity import AdapterLimits, AdapterRejected, base_norms_from_dir, check_adapter

    state, library = world[0], world[2]
    norms = base_norms_from_dir(resolve_base_model(state.cfg.base_model), state.spec)
    check_adapter(library.load(world[3]), state.cfg.adapter_limits, norms)
    with pytest.raises(AdapterRejected, match="max_relative_update"):
        check_adapter(library.load(world[3]), AdapterLimits(max_relative_update=1.0), norms)


# ---- safe by default ------------------------------------------------------------------------------------


def test_without_a_key_only_local_programs_may_mutate(client, world, tmp_path):
    aid = world[3]
    evil = {"Origin": "http://evil.example"}
    r = client.post("/v1/adapters", json={"description": "Be kind.", "save": True}, headers=evil)
    assert r.status_code == 403 and "another origin" in r.json()["error"]["message"]
    assert "access-control-allow-origin" not in r.headers  # CORS is off unless configured
    r = client.delete(f"/v1/adapters/{aid}", headers={"Referer": "http://evil.example/page"})
    assert r.status_code == 403
    data = _archive(world[1].adapter(), tmp_path)
    r = client.post("/v1/adapters/upload", files={"file": ("a.tar.gz", data)}, data={"description": "x"})
    assert r.status_code == 403 and "multipart/form-data" in r.json()["error"]["message"]
    same = {"Origin": "http://testserver"}
    r = client.post("/v1/adapters", json={"description": "Be kind.", "save": True}, headers=same)
    assert r.status_code == 200, r.text
    assert _upload(client, data).status_code == 201  # a raw body from a local program needs no key
    os.environ["HL_TEST_KEY"] = "k"
    try:
        assert _upload(client, data).status_code == 401
        r = client.post("/v1/adapters/upload", files={"file": ("a.tar.gz", data)}, data={"description": "x"},
                        headers={"Authorization": "Bearer k", **evil})
        assert r.status_code == 201  # with the key, the origin does not matter
    finally:
        os.environ.pop("HL_TEST_KEY")


def test_unsaved_adapters_are_not_listed_but_fetchable(client):
    gen = client.post("/v1/adapters", json={"description": "Mine only."}).json()["adapters"][0]
    assert gen["id"] not in {a["id"] for a in client.get("/v1/adapters").json()["data"]}
    assert gen["id"] not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.get(f"/v1/adapters/{gen['id']}").json()["id"] == gen["id"]
    assert client.get(f"/v1/models/{gen['id']}").json()["id"] == gen["id"]


def test_cors_only_when_configured(world):
    from fastapi.testclient import TestClient

    from serve.api import build_api

    state = world[0]
    allowed = state.cfg.model_copy(update={"cors_origins": ["http://app.example"]})
    with TestClient(build_api(type(state)(**{**state.__dict__, "cfg": allowed}))) as c:
        r = c.get("/v1/models", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": "http://x.example"}).headers


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "base", "prompt": "x", "seed": False}, "seed"),  # JSON false is not an integer
    ("/v1/completions", {"model": "base", "prompt": "x", "echo": 0}, "echo"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "logprobs": 0},
     "logprobs"),
    ("/v1/adapters", {"description": "x", "save": 0}, "save"),
    ("/v1/adapters", {"description": None}, None),  # exactly one of description/descriptions, not null
    ("/v1/completions", {"model": "base", "prompt": []}, "prompt"),
    ("/v1/route", {"inputs": ["ok", "  "]}, "inputs.1"),
    ("/v1/adapters", {"description": "x", "name": "\x99\x04\xd6"}, "name"),  # a control character, even alone
    ("/v1/adapters", {"description": "x", "name": "\x04"}, "name"),
    ("/v1/adapters", {"description": "x", "name": " \x85"}, "name"),  # blank to str.strip(), not to ECMA's \s
    ("/v1/adapters", {"descriptions": ["ok", "\x1f"]}, "descriptions.1"),  # blank to str.strip(), not to \s elsewhere
    ("/v1/route", {"input": "\u3000\x1c"}, "input"),
])
def test_values_the_schema_refuses_are_422(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param, r.text
    if param == "name":
        assert r.json()["error"]["message"] == "name: must hold some text, without control characters"


def test_blank_means_what_str_strip_removes_in_the_schema_and_the_server():
    """The schema's patterns name the blank characters one by one, so its readers (ECMA regexes), pydantic (Rust
    regexes) and the server (str.strip) agree on which text is blank."""
    import re

    from pydantic import TypeAdapter, ValidationError

    from serve.schemas import NAME_PATTERN, SPACE, AdapterName, NonBlank

    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    assert [c for c in chars if not re.search(f"[^{SPACE}]", c)] == [c for c in chars if c.isspace()]
    non_blank, name = TypeAdapter(NonBlank), TypeAdapter(AdapterName)
    for c in ("\x1c", "\x1f", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff", "\u200b", "\x04", "a"):
        for adapter, text, ok in ((non_blank, c, bool(c.strip())),
                                  (name, c, bool(c.strip()) and ord(c) >= 32),
                                  (name, f"a{c}", ord(c) >= 32)):
            try:
                adapter.validate_python(text)
                assert ok, repr(text)
            except ValidationError:
                assert not ok, repr(text)
            assert bool(re.fullmatch(NAME_PATTERN, text)) == ok or adapter is non_blank


def test_schema_states_what_the_server_checks(client):
    """The OpenAPI schema carries the rules the server enforces (exactly one of, not both, non-blank text, the
    generator kinds), so a schema-valid request is not refused for them."""
    from typing import get_args

    from generator.generate import GENERATORS
    from serve.schemas import SPACE, GeneratorKind

    assert set(get_args(GeneratorKind)) == set(GENERATORS)
    comps = client.get("/openapi.json").json()["components"]["schemas"]
    gen = comps["GenerateAdaptersRequest"]
    assert len(gen["oneOf"]) == 2 and {"required": ["description"], "properties": {
        "description": {"not": {"type": "null"}}, "descriptions": {"type": "null"}}} in gen["oneOf"]
    assert comps["CompletionRequest"]["not"]["required"] == ["task_description", "adapters"]
    assert comps["RouteRequest"]["properties"]["input"]["anyOf"][0]["pattern"] == f"[^{SPACE}]"


def test_blank_chat_with_auto_answers_from_the_base_model(client, world):
    """Nothing to route by (only a blank message): no router call, the base model answers (was a 500)."""
    world[1].routes.clear()
    r = client.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": " "}],
                                                  "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["hyperlora"]["abstained"] is True
    r = client.post("/v1/completions", json={"model": "base", "prompt": "x"})  # no max_tokens: the default, capped
    assert r.status_code == 200 and world[1].requests[-1].max_new_tokens <= world[0].cfg.engine.max_new_tokens


def test_a_temperature_next_to_zero_is_greedy(client, world):
    r = client.post("/v1/completions", json={"model": "base", "prompt": "x", "temperature": 1e-40})
    assert r.status_code == 200, r.text
    assert world[1].requests[-1].temperature == 0.0


def test_a_name_made_from_a_description_is_one_the_library_takes():
    from retriever.records import check_fields
    from serve.api import default_name

    name = default_name("tab\there,\x1cnewline\nend " + "x" * 300)
    assert name.startswith("tab here, newline end ") and len(name) == 200
    assert check_fields(name, ["d"], "generated", [])[0] == name
    assert default_name("\x1b\x1f") == "unnamed"


def test_a_description_of_control_characters_saves_under_a_name(client):
    r = client.post("/v1/adapters", json={"descriptions": ["Be kind.", "\x1b"], "save": True})
    assert r.status_code == 200, r.text
    assert [a["name"] for a in r.json()["adapters"]] == ["Be kind.", "unnamed"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 5}),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}),
])
def test_ignore_eos_reaches_the_llm_and_is_documented(client, world, path, body):
    """vLLM's `ignore_eos`: false unless asked, passed to the LLM as given, only true/false, in the schema."""
    assert client.post(path, json=body).status_code == 200
    assert _last(world).ignore_eos is False
    assert client.post(path, json={**body, "ignore_eos": True}).status_code == 200
    assert _last(world).ignore_eos is True and _last(world).max_new_tokens == 5
    r = client.post(path, json={**body, "ignore_eos": 1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "ignore_eos"
    comps = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        field = comps[name]["properties"]["ignore_eos"]
        assert field["type"] == "boolean" and field["default"] is False and "max_tokens" in field["description"]


def test_the_gateway_starts_and_routes_without_torch(world):
    """Its module, its state (library, unsaved store, config) and its routes import no torch, transformers or FAISS:
    two Gateway replicas start beside the model replicas on two cores (torch is ~1.3 s of CPU per process). torch
    comes in with the first adapter the Gateway handles."""
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from serve.gateway import build_state\n"
            "from serve.api import build_api\n"
            "state = build_state(json.loads(sys.argv[1]), None, None, None)\n"
            "app = build_api(state)\n"
            "assert any(getattr(r, 'path', '') == '/v1/completions' for r in app.routes)\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'faiss', 'safetensors', "
            "'sentence_transformers') if m in sys.modules)))\n")
    config = json.dumps(world[0].cfg.model_dump(mode="json", exclude={"deployments"}))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, config], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_hyperlora_serve_binds_the_app_without_torch():
    """`hyperlora serve` (the command and the application it binds) imports no torch, transformers or FAISS: its
    imports come before `ray.init`, on the critical path of every start."""
    import subprocess
    import sys

    code = ("import json, sys\n"
            "import hyperlora\n"
            "from serve.app import build_app\n"
            "from serve.config import ServeConfig\n"
            "build_app(ServeConfig.from_yaml())\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules)))\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []
