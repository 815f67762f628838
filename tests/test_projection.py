"""The description projection (retriever/projection.py): it learns to set apart tasks that raw cosines confuse,
round-trips through safetensors, splits tasks by source, and the router scores projected keys and queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_adapter

from retriever.config import RetrieverConfig
from retriever.library import AdapterLibrary
from retriever.projection import DescriptionProjection, ProjectionConfig, fit_projection, source_folds, unit
from retriever.router import Router
from retriever.strategy import StrategyConfig, Thresholds
from retriever.strategy_config import key_configs


def _confusable(seed: int = 0, n_tasks: int = 6, per_task: int = 40, dim: int = 16):
    """Each task's key has a task direction and a style direction; its paraphrases share the task direction, but
    their style is noise as large as the task signal: raw cosines confuse the tasks, a map that drops the style
    directions does not."""
    rng = np.random.default_rng(seed)
    common = np.zeros(dim)
    common[0] = 2.0
    task, style = np.eye(dim)[1: 1 + n_tasks] * 0.6, np.eye(dim)[1 + n_tasks: 1 + 2 * n_tasks] * 0.6
    keys = unit(common + task + style)
    owner = np.repeat(np.arange(n_tasks), per_task)
    noise = np.zeros((len(owner), dim))
    noise[:, 1 + n_tasks: 1 + 2 * n_tasks] = rng.normal(size=(len(owner), n_tasks)) * 0.8
    return keys.astype(np.float32), unit(common + task[owner] + noise).astype(np.float32), owner


def _accuracy(keys, queries, owner, projection=None):
    if projection is not None:
        keys, queries = projection(keys), projection(queries)
    return float(((queries @ keys.T).argmax(1) == owner).mean())


def test_fit_projection_sets_apart_tasks_that_raw_cosines_confuse():
    keys, train_q, train_owner = _confusable(0)
    _, test_q, test_owner = _confusable(1)
    p = fit_projection(keys, train_q, train_owner, ProjectionConfig(steps=300, lr=0.05, identity_weight=0.0))
    raw, projected = _accuracy(keys, test_q, test_owner), _accuracy(keys, test_q, test_owner, p)
    assert projected > raw + 0.1 and projected > 0.9, (raw, projected)
    out = p(test_q)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_projection_of_a_mean_key_equals_the_mean_of_projected_rows(tmp_path):
    """Why the saved raw keys project exactly: unit(unit(mean) @ W) == unit(mean @ W)."""
    rng = np.random.default_rng(0)
    p = DescriptionProjection(rng.normal(size=(8, 8)).astype(np.float32), "e")
    rows = unit(rng.normal(size=(5, 8)).astype(np.float32))
    np.testing.assert_allclose(p(unit(rows.mean(0, keepdims=True))), unit((rows @ p.matrix).mean(0, keepdims=True)),
                               atol=1e-5)
    again = DescriptionProjection.load(p.save(tmp_path / "p.safetensors", ProjectionConfig()))
    np.testing.assert_array_equal(again.matrix, p.matrix)
    assert again.embedder == "e"
    with pytest.raises(ValueError, match=r"takes \(n, 8\) vectors"):
        p(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="square"):
        DescriptionProjection(np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("fields, bad", [({"steps": -1}, "steps=-1"), ({"temperature": 0}, "temperature=0"),
                                         ({"lr": 0}, "lr=0")])
def test_projection_config_names_the_bad_value(fields, bad):
    with pytest.raises(ValueError, match=bad):
        ProjectionConfig(**fields)


def test_source_folds_never_split_a_source():
    sources = ["a", "a", "b", "c", "c", "c", "d", "e", "e", "f"]
    first, second = source_folds(sources, seed=3)
    assert sorted(first.tolist() + second.tolist()) == list(range(10)) and len(first) and len(second)
    assert not {sources[i] for i in first} & {sources[i] for i in second}
    assert (source_folds(sources, seed=3)[0] == first).all()
    assert len(source_folds(["a"] * 4)[1]) == 0  # one source: nothing to split


def test_router_scores_projected_keys_and_queries(tmp_path, encoder, tiny_spec):
    lib = AdapterLibrary(tmp_path / "lib", tiny_spec)
    texts = {"sentiment": "Classify the sentiment of a movie review as positive or negative.",
             "french": "Translate the English sentence into French.",
             "math": "Solve the math word problem and answer with a single number."}
    for i, (name, text) in enumerate(texts.items()):
        lib.add(random_adapter(tiny_spec, seed=i), name, [text], "trained")
    cfg = key_configs(RetrieverConfig(), 8)[0]
    rng = np.random.default_rng(0)
    p = DescriptionProjection((np.eye(encoder.dim) + 0.3 * rng.normal(size=(encoder.dim,) * 2)).astype(np.float32))
    plain, projected = Router(lib, encoder, cfg), Router(lib, encoder, cfg, projection=p)
    query = plain.embed(["Is this film review positive or negative?"])
    keys = plain.embed(list(texts.values()))
    expected = (p(query) @ p(keys).T)[0]
    route = projected.route_vectors(query, 3)[0]
    by_name = dict(zip(route.names, route.scores, strict=True))
    np.testing.assert_allclose([by_name[n] for n in texts], expected, atol=1e-4)
    assert plain.route_vectors(query, 1)[0].names == ["sentiment"]
    raw = dict(zip(*(lambda r: (r.names, r.scores))(plain.route_vectors(query, 3)[0]), strict=True))
    np.testing.assert_allclose([raw[n] for n in texts], (query @ keys.T)[0], atol=1e-4)


def test_thresholds_name_their_projection_and_refuse_a_missing_one(tmp_path):
    shipped = json.loads((Thresholds.load.__globals__["CALIBRATION_FILE"]).read_text())
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({**shipped, "projection": "cal.projection.safetensors"}))
    with pytest.raises(ValueError, match="not beside it"):
        Thresholds.load(StrategyConfig(calibration=str(cal)))
    DescriptionProjection(np.eye(4, dtype=np.float32)).save(tmp_path / "cal.projection.safetensors")
    assert Thresholds.load(StrategyConfig(calibration=str(cal))).projection == str(tmp_path /
                                                                                  "cal.projection.safetensors")
    cal.write_text(json.dumps({**shipped, "projection": None}))
    assert Thresholds.load(StrategyConfig(calibration=str(cal))).projection is None
