"""The description strategy (retriever/strategy.py): config checks, the registered strategies' plans, real
matching with the embedded MiniLM, the exact mixture, out-of-scope flags, and calibration end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_adapter

from retriever.router import Route
from retriever.strategy import STRATEGIES, DescriptionStrategy, StrategyConfig, Thresholds, TrainTasks

SNI = Path(os.environ.get("HYPERLORA_SNI", Path(__file__).resolve().parents[2] / "shared" / "data" / "sni"))
NONSENSE = ["dogs; cats; bananas", "xkq zvw plmq rrt", "..."]  # random characters, a list of nouns, empty-looking
LIBRARY_TASKS = {
    "sentiment": ["Classify the sentiment of a movie review as positive or negative.",
                  "Decide whether the given film review expresses a positive or a negative opinion."],
    "french": ["Translate the English sentence into French.",
               "Given a sentence in English, write its French translation."],
    "arithmetic": ["Solve the math word problem and answer with a single number.",
                   "Read the arithmetic question and give the numeric answer."],
}


@pytest.mark.parametrize("fields, bad", [
    ({"strategy": "magic"}, "strategy='magic'"),
    ({"top_k": 0}, "top_k=0"),
    ({"mix_generated_weight": 1.0}, "mix_generated_weight=1.0"),
    ({"reject_below": 2}, "reject_below=2"),
    ({"match_threshold": 1.5}, "match_threshold=1.5"),
])
def test_config_names_the_bad_value(fields, bad):
    with pytest.raises(ValueError, match=bad):
        StrategyConfig(**fields)
    with pytest.raises(ValueError, match="unknown StrategyConfig field"):
        StrategyConfig.from_dict({"nope": 1})


@pytest.mark.parametrize("fields, bad", [
    ({"library_fractions": (0.5, 1.0)}, "library_fractions="),
    ({"library_fractions": ()}, "library_fractions="),
    ({"library_draws": 0}, "library_draws=0"),
])
def test_calibration_config_names_the_bad_value(fields, bad):
    from retriever.calibrate import CalibrationConfig

    with pytest.raises(ValueError, match=bad):
        CalibrationConfig(**fields)


T = Thresholds(match_threshold=0.8, match_margin=0.05, near_threshold=0.6, scope_threshold=0.3)


@pytest.mark.parametrize("strategy, scores, path, ids", [
    ("auto", [0.9, 0.7], "retrieve", ["a"]),  # confident single match
    ("auto", [0.9, 0.88], "mix", [None, "a", "b"]),  # two close matches: no margin, both near
    ("auto", [0.7, 0.5], "mix", [None, "a"]),  # near but not confident: mixed with the generated adapter
    ("auto", [0.5, 0.4], "generate", [None]),  # nothing close
    ("retrieve", [0.2, 0.1], "retrieve", ["a"]),
    ("generate", [0.99, 0.1], "generate", [None]),
    ("retrieve", [], "generate", [None]),  # empty library
])
def test_plans(strategy, scores, path, ids):
    names = ["a", "b"][: len(scores)]
    route = Route(names, names, scores, [1.0 / max(len(scores), 1)] * len(scores), False)
    plan = STRATEGIES[strategy](StrategyConfig(), T).plan(route, _route({"a": 0.5, "b": 0.4}))
    assert plan.path == path and [i for i, _ in plan.mixture] == ids and not plan.by_instruction
    assert sum(w for _, w in plan.mixture) == pytest.approx(1.0)


def _route(scores: dict[str, float]) -> Route:
    return Route(list(scores), list(scores), list(scores.values()), [1.0 / max(len(scores), 1)] * len(scores), False)


@pytest.mark.parametrize("strategy, instruction, path, ids", [
    ("auto", {"c": 1.0, "a": 0.9}, "retrieve", ["c"]),  # restates c's instruction: c, whatever the descriptions say
    ("retrieve", {"c": 0.99, "a": 0.9}, "retrieve", ["c"]),
    ("auto", {"c": 1.0, "a": 0.99}, "generate", [None]),  # two adapters share the instruction: descriptions decide
    ("auto", {"c": 0.95}, "generate", [None]),  # near an instruction but not restating it
    ("retrieve", {"c": 0.95}, "retrieve", ["a"]),
    ("generate", {"c": 1.0}, "generate", [None]),
])
def test_an_instruction_match_comes_first(strategy, instruction, path, ids):
    plan = STRATEGIES[strategy](StrategyConfig(), T).plan(_route({"a": 0.5, "b": 0.4}), _route(instruction))
    assert plan.path == path and [i for i, _ in plan.mixture] == ids and plan.by_instruction == (ids == ["c"])


@pytest.fixture
def strategy(tmp_path, tiny_spec, encoder):
    from retriever.library import AdapterLibrary

    lib = AdapterLibrary(tmp_path / "lib", tiny_spec)
    for seed, (name, descriptions) in enumerate(LIBRARY_TASKS.items()):
        lib.add(random_adapter(tiny_spec, seed=seed), name, descriptions, "trained")
    return DescriptionStrategy(lib, encoder)


@pytest.mark.slow
def test_a_description_copied_from_a_library_task_returns_its_adapter(strategy):
    ids = {r.name: r.id for r in strategy.library.list()}
    decisions, vectors = strategy.decide([LIBRARY_TASKS["french"][1], LIBRARY_TASKS["sentiment"][0]])
    assert vectors.shape == (2, strategy.encoder.dim)
    for d, task in zip(decisions, ("french", "sentiment"), strict=True):
        assert d.path == "retrieve" and d.library_id == ids[task] and not d.needs_generation
        assert d.matches[0].name == task and d.matches[0].similarity > strategy.thresholds.match_threshold
        assert not d.out_of_scope and d.warning is None and 0 < d.confidence <= 1
        assert strategy.build(d, None) is None  # served by id from the library
    forced = strategy.decide([LIBRARY_TASKS["french"][1]], "generate")[0][0]
    assert forced.path == "generate" and forced.needs_generation and forced.matches[0].name == "french"


@pytest.mark.slow
def test_a_library_adapter_is_found_by_its_own_instruction(strategy, tiny_spec):
    """A trained LoRA's descriptions paraphrase its task; its instruction (the task's definition, from its
    hyperlora.json) is a key too, so the definition itself returns the adapter, in both strategies that look."""
    definition = ("You are given a list of integers. Remove every integer that appears more than once in the list "
                  "and return the remaining integers in their original order, as a list in brackets.")
    adapter = random_adapter(tiny_spec, seed=9)
    adapter.metadata["instruction"] = definition
    own = strategy.library.add(adapter, "dedupe", ["Keep only the numbers that occur a single time.",
                                                   "Drop the repeated values of a number sequence."], "trained")
    decisions, _ = strategy.decide([definition])
    assert decisions[0].path == "retrieve" and decisions[0].library_id == own.id
    assert decisions[0].matches[0].key == "instruction" and decisions[0].matches[0].similarity > 0.99
    assert strategy.decide([definition], "retrieve")[0][0].library_id == own.id
    paraphrase = strategy.decide(["Remove the duplicates from a list of integers."])[0][0]
    assert not paraphrase.matches or paraphrase.matches[0].key == "descriptions"


@pytest.mark.slow
def test_nonsense_is_flagged_and_can_be_refused(strategy):
    decisions, _ = strategy.decide(NONSENSE)
    for d in decisions:
        assert d.out_of_scope and d.warning and "far from every task" in d.warning, d
        assert d.confidence < 0.2 and d.path == "generate" and not d.rejected
    strict = DescriptionStrategy(strategy.library, strategy.encoder, StrategyConfig(reject_below=0.5),
                                 train_tasks=strategy.train, thresholds=strategy.thresholds)
    assert all(d.rejected for d in strict.decide(NONSENSE)[0])
    assert not any(d.rejected for d in strict.decide([LIBRARY_TASKS["french"][0]])[0])


def test_mixture_is_the_exact_weighted_sum(strategy, tiny_spec):
    from retriever.strategy import Decision

    lib = strategy.library
    ids = [r.id for r in lib.list()[:2]]
    generated = random_adapter(tiny_spec, seed=7)
    d = Decision("auto", "mix", [], [(None, 0.5), (ids[0], 0.3), (ids[1], 0.2)], 0.5, 0.5, "t", False)
    mixed = strategy.build(d, generated)
    assert mixed.rank == 3 * generated.rank
    parts = [generated, lib.load(ids[0]), lib.load(ids[1])]
    for m in mixed.a:
        want = sum(w * p.scaling * p.b[m] @ p.a[m] for (_, w), p in zip(d.mixture, parts, strict=True))
        torch.testing.assert_close(mixed.scaling * mixed.b[m] @ mixed.a[m], want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the generated adapter"):
        strategy.build(d, None)


@pytest.mark.slow
@pytest.mark.skipif(not (SNI / "manifest.json").exists(), reason="needs ../shared/data/sni (or $HYPERLORA_SNI)")
def test_out_of_scope_flags_nonsense_and_no_dev_definition(encoder):
    """The shipped calibration: the three nonsense strings are flagged, none of the 43 dev task definitions is."""
    manifest = json.loads((SNI / "manifest.json").read_text())
    definitions = [json.loads((SNI / "tasks" / f"{n}.json").read_text())["definition"] for n in manifest["dev"]]
    train, t = TrainTasks.load(), Thresholds.load(StrategyConfig())
    with pytest.warns(UserWarning, match="truncated"):  # a few definitions are longer than MiniLM's window
        sims, _ = train.nearest(encoder.encode([d[:1000] for d in definitions]).numpy())
    junk, _ = train.nearest(encoder.encode(NONSENSE).numpy())
    assert len(definitions) == 43
    assert (junk < t.scope_threshold).all(), junk
    assert (sims >= t.scope_threshold).all(), sorted(zip(sims, manifest["dev"], strict=True))[:3]


def test_match_fit_maximises_expected_quality_and_instruction_fit_avoids_near_copies():
    from retriever.calibrate import fit_instruction, fit_match

    # 4 tasks, even ones in the library; queries of tasks 0 and 2 score 0.85 on their own task, those of the
    # absent tasks 1 and 3 score 0.75 on task 0 (a wrong retrieval), the rest 0.1
    owner = np.array([0, 0, 1, 2, 3])
    scores = np.full((5, 4), 0.1)
    scores[[0, 1, 3], [0, 0, 2]] = 0.85
    scores[[2, 4], [0, 0]] = 0.75
    thr, margin, stats = fit_match(scores, owner, (52.0, 21.0, 5.0))
    assert 0.75 < thr <= 0.85 and stats["precision"] == 1.0 and stats["recall"] == 1.0
    # the queries of held tasks and those of lacking tasks weigh half each: (52 + 21) / 2
    assert stats["expected_quality"] == pytest.approx((52 + 21) / 2, abs=0.01)
    scores[4, 0] = 0.9  # one absent task's query now outscores every right match: retrieving it costs 16 / 4 points
    thr, _, stats = fit_match(scores, owner, (52.0, 21.0, 5.0))  # ... the three right ones gain 31 / 2: worth it
    assert thr <= 0.85 and stats["recall"] == 1.0 and stats["precision"] == pytest.approx(0.5 / 0.75, abs=1e-3)
    # definitions (even tasks' are library instructions): the absent task 1's is a near-copy of task 0's (0.97)
    defs = np.array([[1.0, 0.97, 0.5, 0.2], [0.97, 1.0, 0.5, 0.2], [0.5, 0.5, 1.0, 0.2], [0.2, 0.2, 0.2, 1.0]])
    thr, margin, stats = fit_instruction(defs, recall=0.98)
    assert (thr, margin) == (0.98, 0.0) and stats == {"recall": 1.0, "wrong_matches": 0.0}


def test_match_fit_counts_a_lacking_task_against_the_library_only():
    from retriever.calibrate import fit_match

    # task 0 is held and its query scores 0.8 on it; task 1's query (task 1 lacking) scores 0.85 on task 3, which the
    # library [0, 2] lacks too, and 0.3 on task 0: it cannot be matched wrongly above 0.3
    owner = np.array([0, 1])
    scores = np.array([[0.8, 0.1, 0.1, 0.1], [0.3, 0.9, 0.1, 0.85]])
    thr, _, stats = fit_match(scores, owner, (30.0, 21.0, 0.0), [np.array([0, 2])])
    assert thr <= 0.8 and stats["precision"] == 1.0 and stats["recall"] == 1.0  # (0.3 with a margin, or above)
    # in the library [0, 2, 3], task 1's query would take task 3's adapter (-21) for task 0's +9: generate always
    thr, _, stats = fit_match(scores, owner, (30.0, 21.0, 0.0), [np.array([0, 2, 3])])
    assert thr > 0.85 and stats["recall"] == 0.0
    # averaged over both (each query weighs 1/2): (+4.5 + (4.5 - 10.5)) / 2 < 0 from 0.4 to 0.8; with a 52-point own
    # adapter (+15.5 a right match) it pays in both
    thr, _, stats = fit_match(scores, owner, (30.0, 21.0, 0.0), [np.array([0, 2]), np.array([0, 2, 3])])
    assert thr > 0.85 and stats["libraries"] == 2
    thr, _, stats = fit_match(scores, owner, (52.0, 21.0, 0.0), [np.array([0, 2]), np.array([0, 2, 3])])
    assert thr <= 0.8 and stats["precision"] == pytest.approx(0.5 / 0.75, abs=1e-3)


def test_simulated_libraries_span_the_sizes_and_repeat():
    from retriever.calibrate import simulated_libraries

    libs = simulated_libraries(20, (0.1, 0.5, 0.99), draws=2, seed=3)
    assert [len(x) for x in libs] == [2, 2, 10, 10, 19, 19]
    assert all((np.diff(x) > 0).all() and x.max() < 20 for x in libs)
    again = simulated_libraries(20, (0.1, 0.5, 0.99), draws=2, seed=3)
    assert all((a == b).all() for a, b in zip(libs, again, strict=True))


@pytest.mark.slow
def test_calibration_end_to_end_on_tiny_data(tmp_path, encoder):
    from retriever.calibrate import CalibrationConfig, calibrate
    from retriever.projection import ProjectionConfig

    sni = tmp_path / "sni"
    (sni / "tasks").mkdir(parents=True)
    tasks = {"t1_sentiment": "Label the sentiment of the review {} as positive or negative.",
             "t2_french": "Translate sentence {} from English into French.",
             "t3_sum": "Add the two numbers in example {} and give the sum.",
             "t4_ner": "List the person names that appear in text {}."}
    sources = {"t1_sentiment": "s1", "t2_french": "s1", "t3_sum": "s2", "t4_ner": "s3"}
    for name, template in tasks.items():
        doc = {"name": name, "definition": template.format("X"), "source": [sources[name]],
               "descriptions": [template.format(i) for i in range(160)], "instances": []}
        (sni / "tasks" / f"{name}.json").write_text(json.dumps(doc))
    (sni / "manifest.json").write_text(json.dumps({"train": list(tasks), "dev": []}))
    out_json, out_rows = tmp_path / "cal.json", tmp_path / "rows.safetensors"
    result = calibrate(encoder, CalibrationConfig(str(sni), queries_per_task=2, nonsense=20), out_json, out_rows)
    saved = json.loads(out_json.read_text())
    assert saved["match_threshold"] == result["match_threshold"] and saved["stats"]["train_tasks"] == 4
    assert saved["scope_floor"] < saved["scope_reference"] and saved["scope_threshold"] < saved["scope_reference"]
    assert saved["stats"]["instruction"] == {"recall": 1.0, "wrong_matches": 0.0}
    assert saved["stats"]["match"]["expected_quality"] >= max(saved["stats"]["match"]["always_retrieve"], 21.0)
    rows = TrainTasks.load(out_rows)
    assert rows.vectors.shape == (8, encoder.dim) and rows.tasks[:4] == sorted(tasks)
    np.testing.assert_allclose(np.linalg.norm(rows.vectors[:4], axis=1), 1.0, atol=1e-2)
    loaded = Thresholds.load(StrategyConfig(calibration=str(out_json), match_margin=0.2))
    assert loaded.match_margin == 0.2 and loaded.scope_threshold == saved["scope_threshold"]
    # raw and projected scores were both fitted, cross-fitted over the two source halves; the better one is kept
    by_scores = saved["stats"]["match"]["expected_quality_by_scores"]
    assert set(by_scores) == {"raw", "projected"} and saved["stats"]["match"]["libraries"] >= 2
    kept = saved["stats"]["match"]["scores"]
    assert by_scores[kept] == max(by_scores.values()) == saved["stats"]["match"]["expected_quality"]
    if kept == "projected":
        assert saved["projection"] == "cal.projection.safetensors" and loaded.projection == str(
            tmp_path / "cal.projection.safetensors")
    else:
        assert saved["projection"] is None and loaded.projection is None
    raw = calibrate(encoder, CalibrationConfig(str(sni), queries_per_task=2, nonsense=20,
                                               projection=ProjectionConfig(steps=0)), out_json, out_rows)
    assert raw["projection"] is False and json.loads(out_json.read_text())["projection"] is None


@pytest.mark.parametrize("raw, path", [(None, "retrieve"), ([0.7, 0.2], "retrieve"), ([0.6, 0.2], "mix")])
def test_a_projected_match_also_needs_its_raw_cosine(raw, path):
    """With a projection, a confident match is confident in both spaces: projected score and margin, and the cosine
    before the projection at least `raw_threshold` (routes without raw scores, from a router with no projection,
    skip the gate)."""
    from dataclasses import replace

    route = Route(["a", "b"], ["a", "b"], [0.9, 0.7], [0.5, 0.5], False, raw_scores=raw)
    plan = STRATEGIES["auto"](StrategyConfig(), replace(T, raw_threshold=0.65)).plan(route, _route({"a": 0.5}))
    assert plan.path == path and plan.mixture[0][0] == ("a" if path == "retrieve" else None)
