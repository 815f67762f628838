"""Service pieces that need no model and no Ray: config, uploads, auth, metrics, schemas."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import random_adapter

from generator.spec import ModelSpec

# ---- config -----------------------------------------------------------------------------------------


def test_shipped_yaml_loads_and_builds_the_app():
    from serve.app import build_app
    from serve.config import DEFAULT_CONFIG, ServeConfig

    cfg = ServeConfig.from_yaml(DEFAULT_CONFIG)
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert set(cfg.deployments) == {"Gateway", "Generator", "Router", "LLM"}
    from serve.deployments import LLM_CONCURRENT_BATCHES

    for shipped in (cfg, ServeConfig.from_yaml(Path(DEFAULT_CONFIG).with_name("config.gpu.yaml"))):
        # every @serve.batch batch of the LLM can be open at once, so no request waits for a batch to end
        llm = shipped.deployments["LLM"]
        assert shipped.llm_batch.max_batch_size * LLM_CONCURRENT_BATCHES <= llm.max_ongoing_requests
        assert llm.max_ongoing_requests >= shipped.engine.max_batch_size
    app = build_app(cfg)  # binds the four deployments; starts nothing
    assert type(app).__name__ == "Application"
    assert build_app({"engine": {"max_batch_size": 4}}) is not None  # what `serve run` passes: the args dict


def test_yaml_overrides_and_bad_values(tmp_path):
    from pydantic import ValidationError

    from serve.config import DEFAULT_CONFIG, ServeConfig

    cfg = ServeConfig.from_yaml(DEFAULT_CONFIG, port=8123, library=str(tmp_path))
    assert cfg.port == 8123 and cfg.library_root() == tmp_path
    for bad in ({"engine": {"dtype": "int3"}}, {"engine": {"max_batch_size": 0}}, {"port": 0},
                {"retriever": {"top_k": 0}}, {"retriever": {"nope": 1}}, {"deployments": {"Nope": {}}},
                {"limits": {"max_body_bytes": 1}}, {"unknown_field": 1}):
        with pytest.raises((ValidationError, ValueError)) as e:
            ServeConfig.model_validate(bad)
        assert str(e.value)
    (tmp_path / "c.yaml").write_text("applications:\n- name: x\n  import_path: serve.app:build_app\n"
                                     "  deployments:\n  - name: Mystery\n")
    with pytest.raises(ValueError, match="Mystery"):
        ServeConfig.from_yaml(tmp_path / "c.yaml")


# ---- uploads ----------------------------------------------------------------------------------------


def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)
    return buf.getvalue()


GOOD = {"x/adapter_config.json": b"{}", "x/adapter_model.safetensors": b"weights", "x/README.md": b"hi"}


def test_extract_accepts_a_peft_dir_in_any_archive(tmp_path):
    from serve.uploads import collect_files, extract_archive

    for i, data in enumerate((_zip(GOOD), _tar(list(GOOD.items())))):
        out = extract_archive(data, tmp_path / str(i), 1 << 20, 8)
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    out = collect_files([("adapter_config.json", b"{}"), ("adapter_model.safetensors", b"w")], tmp_path / "f",
                        1 << 20, 8)
    assert (out / "adapter_model.safetensors").read_bytes() == b"w"


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink", "hardlink", "pickle", "unknown", "missing",
                                  "twice", "too_big", "too_many", "not_archive", "zip_symlink"])
def test_extract_refuses_unsafe_or_malformed_uploads(tmp_path, case):
    from serve.errors import InvalidAdapter, TooLarge
    from serve.uploads import extract_archive

    link = tarfile.TarInfo("x/adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("x/adapter_model.safetensors")
    hard.type, hard.linkname = tarfile.LNKTYPE, "x/adapter_config.json"
    zsym = zipfile.ZipInfo("x/adapter_model.safetensors")
    zsym.external_attr = (0o120777 << 16)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("x/adapter_config.json", b"{}")
        zf.writestr(zsym, b"/etc/passwd")
    data, err = {
        "traversal": (_tar([("../../adapter_config.json", b"{}")]), InvalidAdapter),
        "absolute": (_zip({"/etc/adapter_config.json": b"{}"}), InvalidAdapter),
        "symlink": (_tar([("x/adapter_config.json", b"{}"), link]), InvalidAdapter),
        "hardlink": (_tar([("x/adapter_config.json", b"{}"), hard]), InvalidAdapter),
        "pickle": (_zip({**GOOD, "x/adapter_model.bin": b"\x80\x04."}), InvalidAdapter),
        "unknown": (_zip({**GOOD, "x/run.sh": b"rm -rf /"}), InvalidAdapter),
        "missing": (_zip({"x/adapter_config.json": b"{}"}), InvalidAdapter),
        "twice": (_zip({**GOOD, "y/adapter_config.json": b"{}"}), InvalidAdapter),
        "too_big": (_zip({"x/adapter_config.json": b"{}", "x/adapter_model.safetensors": b"0" * 5000}), TooLarge),
        "too_many": (_zip({f"x/.hidden{i}": b"" for i in range(20)}), TooLarge),
        "not_archive": (b"just some bytes", InvalidAdapter),
        "zip_symlink": (zbuf.getvalue(), InvalidAdapter),
    }[case]
    with pytest.raises(err) as e:
        extract_archive(data, tmp_path / "out", 4096, 8)
    assert str(tmp_path) not in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not Path("/tmp/adapter_config.json").exists()


def test_pack_dir_round_trips(tmp_path):
    from serve.uploads import extract_archive, pack_dir

    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"w")
    (src / "metadata.json").write_text("{}")  # library bookkeeping stays out of downloads
    for fmt in ("tar.gz", "zip"):
        out = extract_archive(pack_dir(src, "abc", fmt), tmp_path / fmt, 1 << 20, 8)
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    names = tarfile.open(fileobj=io.BytesIO(pack_dir(src, "abc"))).getnames()
    assert names == ["abc/adapter_config.json", "abc/adapter_model.safetensors"]


# ---- auth and names ---------------------------------------------------------------------------------


def test_mutation_auth():
    from serve.errors import Forbidden, Unauthorized
    from serve.gateway import check_mutation

    check_mutation({}, "127.0.0.1", None, "HYPERLORA_API_KEY")  # no key: localhost may mutate
    check_mutation({}, "::1", None, "HYPERLORA_API_KEY")
    with pytest.raises(Forbidden, match="HYPERLORA_API_KEY is unset"):
        check_mutation({}, "10.1.2.3", None, "HYPERLORA_API_KEY")
    local = {"host": "127.0.0.1:8000", "content-type": "application/json"}
    check_mutation({**local, "origin": "http://127.0.0.1:8000"}, "127.0.0.1", None, "HYPERLORA_API_KEY")
    check_mutation({**local, "content-type": "application/octet-stream"}, "127.0.0.1", None, "HYPERLORA_API_KEY")
    for signal in ({"origin": "http://evil.example"}, {"origin": "null"}, {"referer": "http://localhost:3000/x"},
                   {"sec-fetch-site": "cross-site"}, {"content-type": "multipart/form-data; boundary=x"},
                   {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        with pytest.raises(Forbidden, match="not web pages"):  # any site a local user visits could send these
            check_mutation({**local, **signal}, "127.0.0.1", None, "HYPERLORA_API_KEY")
    check_mutation({"authorization": "Bearer k1", "origin": "http://evil.example"}, "10.1.2.3", "k1",
                   "HYPERLORA_API_KEY")  # with the key, the origin does not matter
    check_mutation({"authorization": "Bearer k1"}, "10.1.2.3", "k1", "HYPERLORA_API_KEY")
    check_mutation({"x-api-key": "k1"}, "10.1.2.3", "k1", "HYPERLORA_API_KEY")
    for headers in ({}, {"authorization": "Bearer k2"}, {"authorization": "k1"}, {"x-api-key": ""}):
        with pytest.raises(Unauthorized):
            check_mutation(headers, "127.0.0.1", "k1", "HYPERLORA_API_KEY")  # a key binds localhost too


def test_model_names():
    from serve.protocol import public_model_name, same_base_model

    assert public_model_name("/tmp/x/tiny-llama") == "tiny-llama"
    assert public_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert same_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", "/models/smollm2-135m-instruct/")
    assert not same_base_model("meta-llama/Llama-3-8B", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert same_base_model("", "anything")


def _info(i: int, **kw):
    from serve.schemas import AdapterInfo

    return AdapterInfo(id=f"tmp-{i:032x}", name="n", descriptions=["d"], source="generated", saved=False,
                       base_model="m", rank=1, target_modules=["q_proj"], created="now", **kw)


def test_unsaved_store_is_bounded_least_recently_used_first(tmp_path):
    import time

    from serve.unsaved import UnsavedStore

    ad = random_adapter(ModelSpec("m", 2, {"q_proj": (8, 8)}), targets=("q_proj",), rank=1)
    store = UnsavedStore(tmp_path, max_bytes=1)
    store.put(ad, _info(0), None)
    per = store.nbytes
    store = UnsavedStore(tmp_path, max_bytes=per * 2)
    store.put(ad, _info(1), None)
    time.sleep(0.02)
    assert store.get(_info(0).id) is not None  # used: now the most recent
    time.sleep(0.02)
    store.put(ad, _info(2), None)
    assert store.ids() == [_info(0).id, _info(2).id] and store.get(_info(1).id) is None


def test_unsaved_adapter_made_through_one_store_is_found_through_another(tmp_path):
    """Two gateway replicas (two stores on one directory): what one makes, the other reads, and deletes."""
    import torch

    from serve.unsaved import UnsavedStore

    ad = random_adapter(ModelSpec("m", 2, {"q_proj": (8, 8), "v_proj": (8, 4)}), rank=2)
    ad.metadata["instruction"] = "Say hi."
    one, two = UnsavedStore(tmp_path, 1 << 20), UnsavedStore(tmp_path, 1 << 20)
    info = _info(7, instruction="Say hi.")
    one.put(ad, info, None)
    got = two.get(info.id, share=lambda a: ("ref", a))
    assert got.info == info and got.ref[0] == "ref" and got.adapter.metadata["instruction"] == "Say hi."
    for m in ad.a:
        assert torch.equal(got.adapter.a[m], ad.a[m]) and torch.equal(got.adapter.b[m], ad.b[m])
    assert [p.name for p in (tmp_path / info.id).iterdir() if p.suffix in (".bin", ".pt", ".pkl")] == []
    assert two.remove(info.id) and one.get(info.id) is None  # gone for the replica that made it too
    assert two.get("../library") is None and two.get("tmp-" + "0" * 31 + "/") is None  # never a path outside


# ---- metrics and schemas ----------------------------------------------------------------------------


def test_prometheus_rendering():
    from serve.metrics import Registry, render_prometheus

    reg = Registry()
    h = reg.histogram("hyperlora_x_seconds", "x latency", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    reg.counter("hyperlora_y", "y count", ("kind",)).inc(2, {"kind": 'a"b'})
    text = render_prometheus([("llm", reg.snapshot())])
    assert 'hyperlora_x_seconds_bucket{component="llm",le="0.1"} 1' in text
    assert 'hyperlora_x_seconds_bucket{component="llm",le="1"} 2' in text
    assert 'hyperlora_x_seconds_bucket{component="llm",le="+Inf"} 3' in text
    assert 'hyperlora_y_total{component="llm",kind="a\\"b"} 2' in text
    import pickle

    assert pickle.loads(pickle.dumps(reg)) is not None  # Ray pickles it with the deployment classes


def test_request_schemas():
    from pydantic import ValidationError

    from serve.schemas import ChatCompletionRequest, CompletionRequest, GenerateAdaptersRequest, RouteRequest

    assert GenerateAdaptersRequest(description="x").texts == ["x"]
    assert RouteRequest(inputs=["a", "b"]).texts == ["a", "b"]
    c = CompletionRequest(model="m", prompt=["a", "b"], stop="\n", user="ignored-openai-field")
    assert c.prompts == ["a", "b"] and c.stops == ("\n",)
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                 max_completion_tokens=7).limit == 7
    for cls, kw in ((GenerateAdaptersRequest, {}), (RouteRequest, {"input": "a", "inputs": ["b"]}),
                    (CompletionRequest, {"model": "m", "prompt": "x", "n": 2}),
                    (CompletionRequest, {"model": "m", "prompt": "x", "echo": True}),
                    (CompletionRequest, {"model": "m", "prompt": "x",
                                         "adapters": [{"id": "a", "weight": float("inf")}]}),
                    (CompletionRequest, {"model": "m", "prompt": "x", "task_description": "t",
                                         "adapters": [{"id": "a"}]}),
                    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                             "logprobs": True})):
        with pytest.raises(ValidationError):
            cls(**kw)


def test_lookup_refuses_an_adapter_of_another_base_model(tmp_path):
    """A library shared with a service of another base model: using its adapter is a 400 naming both."""
    from types import SimpleNamespace

    from generator.spec import ModelSpec
    from retriever.records import AdapterNotFound
    from serve.config import ServeConfig
    from serve.errors import UnknownAdapter, WrongBaseModel
    from serve.gateway import GatewayState
    from serve.unsaved import UnsavedStore

    record = SimpleNamespace(base_model="mistralai/Mistral-7B-v0.1", to_dict=lambda: {})

    class Library:
        def get(self, adapter_id):
            if adapter_id != "abc":
                raise AdapterNotFound(adapter_id)
            return record

    state = GatewayState(cfg=ServeConfig(), spec=ModelSpec("HuggingFaceTB/SmolLM2-135M-Instruct", 1, {}),
                         library=Library(), backends=None,
                         ephemeral=UnsavedStore(tmp_path, 1 << 20))
    with pytest.raises(WrongBaseModel) as e:
        state.lookup("abc")
    assert "Mistral-7B" in e.value.message and "SmolLM2-135M-Instruct" in e.value.message and e.value.status == 400
    with pytest.raises(UnknownAdapter):
        state.lookup("nope")


def test_console_says_whether_an_api_key_is_set(monkeypatch):
    from serve.commands import api_key_notice
    from serve.config import ServeConfig

    cfg = ServeConfig(api_key_env="HL_NOTICE_KEY")
    monkeypatch.delenv("HL_NOTICE_KEY", raising=False)
    text, warn = api_key_notice(cfg)
    assert warn and "HL_NOTICE_KEY is NOT set" in text and "local programs" in text
    monkeypatch.setenv("HL_NOTICE_KEY", "k")
    text, warn = api_key_notice(cfg)
    assert not warn and "HL_NOTICE_KEY is set" in text and "Bearer" in text


def test_replicas_starting_at_once_convert_the_base_model_once(tmp_path, monkeypatch):
    """Every replica resolves the embedded base model as it starts; on a first start one converts, the rest wait."""
    import threading
    import time

    from generator import models

    calls = []

    def convert(out):
        calls.append(out)
        time.sleep(0.2)  # long enough for the other threads to arrive meanwhile
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setenv("HYPERLORA_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.resolve_base_model())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(got)) == 1 and (got[0] / "model.safetensors").exists()


def test_startup_phases_add_up_and_the_serve_command_line_is_read_back(tmp_path):
    import json

    from serve.startup import Phases, _driver_phases

    phases = Phases()
    phases.mark("ray_init")
    phases.mark("deployments")
    d = phases.as_dict()
    assert list(d) == ["process", "ray_init", "deployments", "total"] and d["process"] >= 0
    assert d["total"] >= d["ray_init"] + d["deployments"]
    log = tmp_path / "serve.log"
    log.write_text(f"starting...\nstartup phases: {json.dumps(d)}\nhyperlora is serving\n")
    assert _driver_phases(log) == d


def test_startup_bench_refuses_an_unknown_run_before_launching_anything(tmp_path):
    from serve.config import DEFAULT_CONFIG
    from serve.startup import run

    out = tmp_path / "startup.json"
    with pytest.raises(ValueError, match="'warm'.*fresh, restart and clone"):
        run(["warm"], str(tmp_path), 0, DEFAULT_CONFIG, out)
    assert not out.exists()


def test_startup_bench_refuses_a_restart_of_a_home_never_started(tmp_path):
    """Without --home a restart run would start on a new empty home: a first start, not a restart."""
    from serve.config import DEFAULT_CONFIG
    from serve.startup import run

    out = tmp_path / "startup.json"
    with pytest.raises(ValueError, match="a restart run needs a home started before: pass --home"):
        run(["restart"], None, 0, DEFAULT_CONFIG, out)
    assert not out.exists()


def test_startup_cpu_seconds_name_processes_by_title_and_add_up():
    import os

    from serve.startup import CpuSeconds, _title

    assert _title(["ray::ServeReplica:hyperlora:Gateway.handle_request_with_rejection"]) == \
        "ray::ServeReplica:hyperlora:Gateway"
    assert _title(["/v/bin/python", "-u", "/v/ray/_private/log_monitor.py", "--session-dir=/tmp/x"]) == "log_monitor.py"
    assert _title(["/v/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/x"]) == "gcs_server"
    assert _title(["/v/bin/python", "/repo/.venv/bin/hyperlora", "serve"]) == "hyperlora"
    cpu = CpuSeconds(os.getpid())
    cpu.look()
    got = cpu.as_dict()
    assert got["total"] > 0 and len(got["by_process"]) >= 1
    assert abs(sum(got["by_process"].values()) - got["total"]) < 0.1


def test_server_timing_header_round_trips():
    from serve.bench_http import parse_server_timing
    from serve.protocol import LLMResult, server_timing

    slow = LLMResult("a", "stop", 1, 1, timings={"llm_prepare": 1.0, "llm_queue": 20.0, "llm_decode": 30.0})
    fast = LLMResult("b", "stop", 1, 1, timings={"llm_prepare": 1.0, "llm_queue": 2.0, "llm_decode": 3.0})
    parts = parse_server_timing(server_timing(80.0, 60.0, [fast, slow]))
    assert parts == {"gateway": 20.0, "llm": 60.0, "llm_prepare": 1.0, "llm_queue": 20.0, "llm_decode": 30.0,
                     "llm_transit": 9.0}  # the slowest prompt's stages; the rest of the call is transit
    assert parse_server_timing(server_timing(5.0, 4.0, [LLMResult("c", "stop", 1, 1)])) == {"gateway": 1.0, "llm": 4.0}
    assert parse_server_timing("x;desc=hi, y;dur=2.5, z;dur=oops") == {"y": 2.5}
