"""The adapter library on disk: round trips, atomic writes, crash recovery, refusals."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import random_adapter
from safetensors.torch import load_file, save_file

from generator.peft_io import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError, save_peft
from generator.spec import ModelSpec
from retriever import library as library_mod
from retriever.library import AdapterLibrary, AdapterNotFound, AdapterRecord, InvalidAdapterId


@pytest.fixture
def lib(tmp_path, tiny_spec):
    return AdapterLibrary(tmp_path / "lib", tiny_spec)


def _add(lib, spec, name="task-a", seed=0, samples=("an input",)):
    return lib.add(random_adapter(spec, seed=seed), name, [f"{name} description"], "trained", list(samples))


def test_add_get_load_list_remove_round_trip(lib, tiny_spec):
    adapter = random_adapter(tiny_spec, seed=1)
    rec = lib.add(adapter, "sentiment", ["Classify the sentiment."], "generated", ["I loved it."])
    assert isinstance(rec, AdapterRecord) and len(rec.id) == 32
    assert (rec.name, rec.source, rec.rank, rec.base_model) == ("sentiment", "generated", 4, "tiny-llama")
    assert rec.target_modules == ["q_proj", "v_proj"] and rec.sample_inputs == ["I loved it."]
    assert lib.get(rec.id) == rec and [r.id for r in lib.list()] == [rec.id] and rec.id in lib
    loaded = lib.load(rec.id)
    for m in adapter.a:
        torch.testing.assert_close(loaded.a[m], adapter.a[m])
        torch.testing.assert_close(loaded.b[m], adapter.b[m])
    assert lib.path(rec.id).is_dir() and (lib.path(rec.id) / WEIGHTS_NAME).is_file()
    second = _add(lib, tiny_spec, "other", seed=2)
    assert [r.id for r in lib.list()] == [rec.id, second.id]
    lib.remove(rec.id)
    assert [r.id for r in lib.list()] == [second.id] and rec.id not in lib
    with pytest.raises(AdapterNotFound, match=rec.id):
        lib.get(rec.id)
    with pytest.raises(AdapterNotFound):
        lib.remove(rec.id)


def test_add_under_a_given_id_twice_stores_once(tmp_path, lib, tiny_spec):
    """A request sent again (same idempotency key, so the same id) gets what the first stored, from any process."""
    first = lib.add(random_adapter(tiny_spec, seed=1), "once", ["Stored once."], "generated", adapter_id="k" * 32)
    other = AdapterLibrary(lib.root, tiny_spec)  # another replica
    again = other.add(random_adapter(tiny_spec, seed=2), "twice", ["Stored twice?"], "generated", adapter_id="k" * 32)
    assert again == first and [r.id for r in other.list()] == ["k" * 32]
    with pytest.raises(InvalidAdapterId):
        lib.add(random_adapter(tiny_spec), "x", ["x"], "generated", adapter_id="../escape")


def test_record_to_dict_is_json_safe_without_paths(lib, tiny_spec):
    d = _add(lib, tiny_spec).to_dict()
    assert set(d) == {"id", "name", "descriptions", "source", "base_model", "rank", "target_modules", "created",
                      "sha256", "sample_inputs", "instruction", "strength_with_examples"}
    text = json.dumps(d)
    assert str(lib.root) not in text and "/" not in d["id"]
    assert AdapterRecord.from_dict(d) == lib.get(d["id"])


def test_reopen_gives_same_records_and_version_tracks_other_instances(tmp_path, tiny_spec):
    a = AdapterLibrary(tmp_path / "lib", tiny_spec)
    recs = [_add(a, tiny_spec, f"t{i}", seed=i) for i in range(3)]
    b = AdapterLibrary(tmp_path / "lib")  # no spec: the stored one is used
    assert b.list() == a.list() == sorted(recs, key=lambda r: (r.created, r.id))
    assert b.spec == tiny_spec
    v = a.version
    b.remove(recs[0].id)  # "another process"
    assert a.version != v and recs[0].id not in a and len(a) == 2
    v = a.version
    _add(b, tiny_spec, "t9", seed=9)
    assert a.version != v and len(a) == 3


def test_crash_between_weights_and_rename_leaves_library_consistent(tmp_path, tiny_spec, monkeypatch):
    lib = AdapterLibrary(tmp_path / "lib", tiny_spec)
    kept = _add(lib, tiny_spec, "kept")
    version = lib.version

    def crash(src, dst):
        assert (src / WEIGHTS_NAME).is_file() and (src / "metadata.json").is_file()  # everything written ...
        raise KeyboardInterrupt("simulated crash")  # ... and the process dies before the rename

    monkeypatch.setattr(library_mod, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        _add(lib, tiny_spec, "lost", seed=5)
    monkeypatch.undo()
    assert [r.id for r in lib.list()] == [kept.id] and lib.version == version
    # a harder crash: the process died before its cleanup ran, leaving its staging directory behind
    (lib.root / "staging" / "deadbeef").mkdir()
    save_peft(random_adapter(tiny_spec), lib.root / "staging" / "deadbeef" / "x")
    reopened = AdapterLibrary(tmp_path / "lib")
    assert [r.id for r in reopened.list()] == [kept.id]
    assert not any((lib.root / "staging").iterdir())
    reopened.load(kept.id)
    assert _add(reopened, tiny_spec, "after").id in reopened


def test_half_written_adapter_dir_is_quarantined_on_open(tmp_path, tiny_spec):
    lib = AdapterLibrary(tmp_path / "lib", tiny_spec)
    kept = _add(lib, tiny_spec)
    broken = lib.adapters_dir / ("f" * 32)
    save_peft(random_adapter(tiny_spec), broken)  # weights but no metadata.json
    (lib.adapters_dir / "bad name!").mkdir()
    reopened = AdapterLibrary(tmp_path / "lib")
    assert [r.id for r in reopened.list()] == [kept.id]
    assert sorted(p.name.rsplit("-", 1)[0] for p in (lib.root / "quarantine").iterdir()) == ["bad name!", "f" * 32]


@pytest.mark.parametrize("bad_id", ["../etc", "..", "a/b", "/abs", "a\\b", "", "x" * 65, "id with space", 7])
def test_ids_with_path_characters_are_refused(lib, bad_id):
    for call in (lib.get, lib.load, lib.path, lib.remove):
        with pytest.raises(InvalidAdapterId, match="not valid: ids are 1-64 characters"):
            call(bad_id)


def test_corrupted_weights_are_detected_on_load(lib, tiny_spec):
    rec = _add(lib, tiny_spec)
    path = lib.path(rec.id) / WEIGHTS_NAME
    state = {f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight": torch.zeros(4, 32) for x in "A"}
    save_file(state, str(path))
    with pytest.raises(AdapterFormatError, match="sha256"):
        lib.load(rec.id)


@pytest.mark.parametrize("field, value, message", [
    ("name", "", "name must be a non-empty string"),
    ("source", "stolen", "source 'stolen' is not allowed"),
    ("descriptions", [], "0 descriptions given; allowed: 1 to"),
    ("descriptions", ["ok", "  "], "descriptions #1 is empty"),
    ("descriptions", "a string", "must be a list of strings"),
    ("sample_inputs", ["x" * 5000], "at most 4000 are allowed"),
])
def test_bad_fields_are_refused(lib, tiny_spec, field, value, message):
    kwargs = {"name": "n", "descriptions": ["d"], "source": "uploaded", "sample_inputs": []} | {field: value}
    with pytest.raises(ValueError, match=message):
        lib.add(random_adapter(tiny_spec), **kwargs)
    assert len(lib) == 0


def _upload(tmp_path, tiny_spec, **kw):
    d = tmp_path / "upload"
    save_peft(random_adapter(tiny_spec, **kw), d)
    return d


def test_add_peft_dir_accepts_a_valid_upload(lib, tmp_path, tiny_spec):
    rec = lib.add_peft_dir(_upload(tmp_path, tiny_spec), "mine", ["my task"])
    assert rec.source == "uploaded" and lib.load(rec.id).rank == 4


def test_malformed_uploads_are_refused_with_clear_errors(lib, tmp_path, tiny_spec):
    d = _upload(tmp_path, tiny_spec)
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(AdapterFormatError, match="refusing pickle-based file"):
        lib.add_peft_dir(d, "x", ["d"])
    (d / "adapter_model.bin").unlink()
    state = load_file(str(d / WEIGHTS_NAME))
    first = next(iter(state))
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(d / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lib.add_peft_dir(d, "x", ["d"])
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        lib.add_peft_dir(d, "x", ["d"])
    with pytest.raises(AdapterFormatError, match="is not a directory"):
        lib.add_peft_dir(tmp_path / "nowhere", "x", ["d"])
    assert len(lib) == 0


def test_upload_for_another_base_model_is_refused(lib, tmp_path, tiny_spec):
    other = ModelSpec("other-model", tiny_spec.n_layers, {**tiny_spec.shapes, "q_proj": (48, 48)})
    d = tmp_path / "other"
    save_peft(random_adapter(other), d)
    with pytest.raises(AdapterFormatError, match=r"expected \(4, 32\)"):
        lib.add_peft_dir(d, "x", ["d"])
    with pytest.raises(ValueError, match="q_proj is"):
        lib.add(random_adapter(other), "x", ["d"], "uploaded")


def test_reopening_with_another_base_model_is_refused(tmp_path, tiny_spec):
    AdapterLibrary(tmp_path / "lib", tiny_spec)
    other = ModelSpec("other-model", 3, tiny_spec.shapes)
    with pytest.raises(ValueError, match="holds adapters for tiny-llama, not other-model"):
        AdapterLibrary(tmp_path / "lib", other)


def test_not_found_is_a_key_error_naming_the_id(lib):
    with pytest.raises(KeyError) as e:
        lib.get("0" * 32)
    assert str(e.value) == f"no adapter with id {'0' * 32!r} in the library"


def test_concurrent_adds_from_separate_instances_all_land(tmp_path, tiny_spec):
    AdapterLibrary(tmp_path / "lib", tiny_spec)
    errors = []

    def worker(i):
        try:
            mine = AdapterLibrary(tmp_path / "lib")
            for j in range(3):
                _add(mine, tiny_spec, f"w{i}-{j}", seed=10 * i + j)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lib = AdapterLibrary(tmp_path / "lib")
    assert len(lib) == 12 and lib._read_counter() == 12
