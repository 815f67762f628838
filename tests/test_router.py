"""Routing real SNI inputs with the real embedder over a library of (tiny) adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import random_adapter

from generator.spec import ModelSpec
from retriever.config import RetrieverConfig
from retriever.library import AdapterLibrary
from retriever.router import Route, Router
from retriever.tasks import load_default_tasks

pytestmark = pytest.mark.slow
SNI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sni"
TASKS = ["task063_first_i_elements", "task083_babi_t1_single_supporting_fact_answer_generation",
         "task1146_country_capital", "task1288_glue_mrpc_paraphrasing", "task1404_date_conversion",
         "task1541_agnews_classification", "task190_snli_classification",
         "task751_svamp_subtraction_question_answering"]
CFG = RetrieverConfig(key_samples=10)


def assert_same_routes(a: list[Route], b: list[Route]) -> None:
    """Same adapters in the same order; scores equal up to float noise of the embedder's kernels."""
    assert [(r.ids, r.names, r.abstain) for r in a] == [(r.ids, r.names, r.abstain) for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.scores == pytest.approx(y.scores, abs=1e-5) and x.weights == pytest.approx(y.weights, abs=1e-4)


def held_out(task: str, n: int = 3) -> list[str]:
    """The last instances of a task: never among the shipped sample inputs (the first 20)."""
    return [i["input"] for i in json.loads((SNI / "tasks" / f"{task}.json").read_text())["instances"][-n:]]


@pytest.fixture(scope="module")
def spec():
    from conftest import tiny_llama_config

    return ModelSpec.from_hf_config(tiny_llama_config(), "tiny-llama")


@pytest.fixture(scope="module")
def built(tmp_path_factory, spec, encoder):
    """A library of the 8 tasks with its index already built (copied by tests that change it)."""
    if not SNI.is_dir():
        pytest.skip(f"SNI data not found at {SNI}")
    root = tmp_path_factory.mktemp("sni") / "lib"
    lib = AdapterLibrary(root, spec)
    shipped = {t["name"]: t for t in load_default_tasks()}
    for i, name in enumerate(TASKS):
        lib.add(random_adapter(spec, seed=i), name, shipped[name]["descriptions"], "generated",
                shipped[name]["sample_inputs"])
    Router(lib, encoder, CFG)
    return root


@pytest.fixture
def lib_copy(built, tmp_path):
    shutil.copytree(built, tmp_path / "lib")
    return AdapterLibrary(tmp_path / "lib")


def test_inputs_route_to_their_tasks_adapter(built, encoder):
    router = Router(AdapterLibrary(built), encoder, CFG)
    queries = [(t, q) for t in TASKS for q in held_out(t)]
    routes = router.route([q for _, q in queries], top_k=3)
    top1 = sum(r.names[0] == t for (t, _), r in zip(queries, routes, strict=True)) / len(queries)
    top3 = sum(t in r.names for (t, _), r in zip(queries, routes, strict=True)) / len(queries)
    assert top1 >= 0.9 and top3 >= 0.95, (top1, top3)


def test_reopening_gives_identical_results_from_the_saved_index(built, encoder):
    queries = [q for t in TASKS for q in held_out(t, 2)]
    first = Router(AdapterLibrary(built), encoder, CFG)
    again = Router(AdapterLibrary(built), encoder, CFG)
    assert again._loaded.rebuilt is False
    assert_same_routes(first.route(queries), again.route(queries))


def test_an_index_built_in_the_background_routes_like_one_built_at_once(lib_copy, encoder):
    """The service's Router starts without waiting for its index; a route call made meanwhile waits for it."""
    queries = [q for t in TASKS for q in held_out(t, 2)]
    shutil.rmtree(lib_copy.index_dir)  # no saved index: the background thread has to embed every key
    lib_copy.index_dir.mkdir()
    background = Router(lib_copy, encoder, CFG, background=True)
    routes = background.route(queries)
    assert background._loaded.rebuilt is True
    assert_same_routes(Router(lib_copy, encoder, CFG).route(queries), routes)


def test_routes_are_ranked_weighted_and_abstain_below_threshold(lib_copy, encoder):
    routes = Router(lib_copy, encoder, CFG).route(held_out(TASKS[0], 2), top_k=4)
    for r in routes:
        assert isinstance(r, Route) and len(r.ids) == len(r.names) == len(r.scores) == len(r.weights) == 4
        assert r.scores == sorted(r.scores, reverse=True) and r.weights == sorted(r.weights, reverse=True)
        assert abs(sum(r.weights) - 1) < 1e-6 and not r.abstain
        assert set(r.to_dict()) == {"ids", "names", "scores", "weights", "abstain"}
    strict = Router(lib_copy, encoder, RetrieverConfig(key_samples=10, abstain_threshold=0.99))
    assert all(r.abstain for r in strict.route(held_out(TASKS[0], 2)))


def test_router_follows_adds_and_removes_made_elsewhere(lib_copy, encoder, spec, monkeypatch):
    router = Router(lib_copy, encoder, CFG)
    embedded = []
    real = encoder.encode

    def spy(texts, what="description", **kw):
        if what == "key text":
            embedded.extend(texts)
        return real(texts, what, **kw)

    monkeypatch.setattr(encoder, "encode", spy)
    other = AdapterLibrary(lib_copy.root)  # another process's view
    new = "task1321_country_continent"
    shipped = next(t for t in load_default_tasks() if t["name"] == new)
    rec = other.add(random_adapter(spec, seed=99), new, shipped["descriptions"], "trained", shipped["sample_inputs"])
    routes = router.route(held_out(new))
    assert embedded == shipped["sample_inputs"][: CFG.key_samples]  # only the new adapter's key was embedded
    assert sum(r.ids[0] == rec.id for r in routes) >= 2
    other.remove(rec.id)
    assert all(rec.id not in r.ids for r in router.route(held_out(new)))
    assert router.n_adapters == len(TASKS)


def test_routers_with_other_keys_over_the_library_keep_its_cached_keys(tmp_path, encoder, spec, monkeypatch):
    """The service's Router and the description strategy's routers share the library's index directory: many
    rebuilds by the others (one per saved adapter) leave the Router's builds, so it embeds only the new keys."""
    from retriever.index_store import KEEP_BUILDS

    lib = AdapterLibrary(tmp_path / "lib", spec)
    made = random_adapter(spec)
    made.metadata["instruction"] = "Add the numbers."
    lib.add(made, "sums", ["Add the numbers."], "generated", ["What is 3 + 4?", "What is 10 + 2?"])
    Router(lib, encoder, CFG)
    others = [RetrieverConfig(key_mode="description"), RetrieverConfig(key_mode="instruction")]
    added = []
    for i in range(KEEP_BUILDS + 1):
        added.append(lib.add(random_adapter(spec, seed=i), f"task-{i}", [f"Repeat the word number {i}."],
                             "generated", [f"word {i}", f"another word {i}"]))
        for cfg in others:
            Router(lib, encoder, cfg)
    embedded = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts, what="description", **kw: (
        embedded.extend(texts) if what == "key text" else None) or real(texts, what, **kw))
    router = Router(lib, encoder, CFG)
    assert router._loaded.rebuilt and router.n_adapters == 1 + len(added)
    assert sorted(embedded) == sorted(s for r in added for s in r.sample_inputs)  # the new adapters' keys only


def test_hnsw_router_agrees_with_flat(lib_copy, encoder):
    queries = [q for t in TASKS for q in held_out(t, 2)]
    flat = Router(lib_copy, encoder, CFG)
    hnsw = Router(lib_copy, encoder, RetrieverConfig(key_samples=10, index="hnsw", hnsw_m=8, hnsw_ef_construction=16))
    assert (flat.index_type, hnsw.index_type) == ("flat", "hnsw")
    assert [r.ids for r in flat.route(queries, top_k=3)] == [r.ids for r in hnsw.route(queries, top_k=3)]


def test_key_vectors_are_reused_by_content_across_ids(lib_copy, encoder, spec, monkeypatch):
    Router(lib_copy, encoder, CFG)
    rec = lib_copy.list()[0]
    lib_copy.remove(rec.id)
    again = lib_copy.add(random_adapter(spec, seed=7), rec.name, rec.descriptions, "generated", rec.sample_inputs)
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("a cached key was embedded again"))
    router = Router(lib_copy, encoder, CFG)
    assert router._loaded.rebuilt and again.id in router._loaded.label_to_id.values()


def test_a_damaged_saved_index_is_rebuilt(lib_copy, encoder):
    queries = held_out(TASKS[2], 2)
    expected = Router(lib_copy, encoder, CFG).route(queries)
    for f in lib_copy.index_dir.glob("*/index.faiss"):
        f.write_bytes(b"garbage")
    router = Router(AdapterLibrary(lib_copy.root), encoder, CFG)
    assert router._loaded.rebuilt is True
    assert_same_routes(router.route(queries), expected)


def test_empty_library_abstains(tmp_path, encoder):
    router = Router(AdapterLibrary(tmp_path / "empty"), encoder)
    assert router.route(["hello"]) == [Route([], [], [], [], abstain=True)]


def test_adapter_without_sample_inputs_is_keyed_by_its_descriptions(tmp_path, encoder, spec):
    lib = AdapterLibrary(tmp_path / "lib", spec)
    rec = lib.add(random_adapter(spec), "capitals", ["Name the capital city of the given country."], "generated")
    lib.add(random_adapter(spec), "sums", ["Add the numbers."], "generated", ["What is 3 + 4?", "What is 10 + 2?"])
    (route,) = Router(lib, encoder).route(["What is the capital city of France?"], top_k=2)
    assert route.ids[0] == rec.id


def test_instruction_keys_hold_the_adapters_made_for_an_instruction(tmp_path, encoder, spec):
    """key_mode="instruction": an adapter with an instruction (its hyperlora.json) is keyed by it, one without is
    not in that index; the other modes keep their keys, and labels of different kinds never collide."""
    from retriever.keys import KIND_DESCRIPTION, KIND_INSTRUCTION, key_texts, kind_of

    lib = AdapterLibrary(tmp_path / "lib", spec)
    made = random_adapter(spec)
    made.metadata["instruction"] = "Name the capital city of the given country."
    rec = lib.add(made, "capitals", ["Which city governs this nation?"], "trained")
    lib.add(random_adapter(spec), "sums", ["Add the numbers."], "generated")
    cfg = RetrieverConfig(key_mode="instruction")
    assert key_texts(rec, cfg) == {KIND_INSTRUCTION: [made.metadata["instruction"]]}
    assert set(key_texts(rec, RetrieverConfig(key_mode="description"))) == {KIND_DESCRIPTION}
    router = Router(lib, encoder, cfg)
    (route,) = router.route([made.metadata["instruction"]], top_k=2)
    assert route.ids == [rec.id] and route.scores[0] > 0.99
    labels = router._loaded.index.labels()
    assert kind_of(labels).tolist() == [KIND_INSTRUCTION] and router._loaded.label_to_id[int(labels[0])] == rec.id


def test_bad_requests_are_refused(lib_copy, encoder):
    router = Router(lib_copy, encoder, CFG)
    with pytest.raises(ValueError, match="top_k=0 is not allowed: give an integer from 1 to 64"):
        router.route(["x"], top_k=0)
    with pytest.raises(ValueError, match="input #1 is empty"):
        router.route(["fine", "  "])
