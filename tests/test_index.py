"""FAISS index types behind one interface, and the retriever's config checks."""

from __future__ import annotations

import numpy as np
import pytest

from retriever.config import RetrieverConfig
from retriever.index import INDEX_TYPES, build_index, choose_index_type, ivf_nlist


def clustered(n, dim=32, n_centers=20, seed=0):
    """Unit vectors around a few centres, like sentence embeddings of a few task families."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, dim))
    x = centers[rng.integers(0, n_centers, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


CASES = [  # (index type, config overrides)
    ("flat", {}),
    ("hnsw", {"hnsw_m": 16, "hnsw_ef_construction": 40, "hnsw_ef_search": 64}),
    ("ivf", {"ivf_nlist": 8, "ivf_nprobe": 8}),
]


@pytest.mark.parametrize("kind, overrides", CASES)
def test_index_returns_caller_labels_and_finds_itself(kind, overrides):
    x = clustered(400)
    labels = np.arange(400, dtype=np.int64) * 1_000_003 + 7  # arbitrary, sparse int64 labels
    index = build_index(x, labels, RetrieverConfig(**overrides), kind)
    assert index.name == kind and index.ntotal == 400
    scores, found = index.search(x[:50], 5)
    assert scores.shape == found.shape == (50, 5)
    assert (found[:, 0] == labels[:50]).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize("kind, overrides", CASES)
def test_save_and_load_give_identical_results(tmp_path, kind, overrides):
    x, q = clustered(300), clustered(20, seed=1)
    cfg = RetrieverConfig(**overrides)
    index = build_index(x, np.arange(300), cfg, kind)
    index.save(tmp_path / "i.faiss")
    again = INDEX_TYPES[kind].load(tmp_path / "i.faiss", 32, cfg)
    s1, l1 = index.search(q, 10)
    s2, l2 = again.search(q, 10)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(s1, s2)
    assert sorted(again.labels().tolist()) == list(range(300))


def test_hnsw_and_flat_agree_on_a_small_set():
    x, q = clustered(500), clustered(50, seed=2)
    flat = build_index(x, np.arange(500), RetrieverConfig(), "flat")
    hnsw = build_index(x, np.arange(500), RetrieverConfig(hnsw_m=16, hnsw_ef_search=128), "hnsw")
    _, l_flat = flat.search(q, 5)
    s_hnsw, l_hnsw = hnsw.search(q, 5)
    assert (l_flat == l_hnsw).all()


def test_ivf_with_every_cell_probed_is_exact():
    x, q = clustered(800), clustered(30, seed=3)
    flat = build_index(x, np.arange(800), RetrieverConfig(), "flat")
    ivf = build_index(x, np.arange(800), RetrieverConfig(ivf_nlist=16, ivf_nprobe=16), "ivf")
    assert (flat.search(q, 10)[1] == ivf.search(q, 10)[1]).all()


def test_hnsw_search_for_more_than_ef_search_returns_k_hits():
    x = clustered(200)
    index = build_index(x, np.arange(200), RetrieverConfig(hnsw_ef_search=4), "hnsw")
    _, labels = index.search(x[:3], 50)
    assert (labels >= 0).all() and labels.shape == (3, 50)


def test_empty_index_searches_to_no_hits():
    index = build_index(np.zeros((0, 8), np.float32), np.zeros(0, np.int64), RetrieverConfig())
    scores, labels = index.search(np.ones((2, 8), np.float32), 3)
    assert (labels == -1).all() and index.ntotal == 0


def test_auto_switches_to_the_approximate_index_past_the_threshold():
    cfg = RetrieverConfig(switch_threshold=100, approximate="ivf")
    assert choose_index_type(99, cfg) == "flat" and choose_index_type(100, cfg) == "ivf"
    assert choose_index_type(10, RetrieverConfig(index="hnsw")) == "hnsw"
    assert ivf_nlist(1_000_000, RetrieverConfig()) == 2000 and ivf_nlist(100, RetrieverConfig()) == 2


def test_bad_vectors_and_labels_are_refused():
    with pytest.raises(ValueError, match=r"queries must be \(n, 8\), got \(1, 32\)"):
        build_index(clustered(10)[:, :8], np.arange(10), RetrieverConfig(), "flat").search(clustered(1), 1)
    with pytest.raises(ValueError, match="labels must be unique"):
        build_index(clustered(3), np.array([1, 1, 2]), RetrieverConfig(), "flat")
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        build_index(clustered(3), np.arange(3), RetrieverConfig(), "annoy")


@pytest.mark.parametrize("overrides, message", [
    ({"index": "lsh"}, "index='lsh' \\(allowed: \\['auto', 'flat', 'hnsw', 'ivf'\\]\\)"),
    ({"top_k": 0}, "top_k=0 \\(must be an integer in \\[1, 64\\]\\)"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"abstain_threshold": 2.0}, "abstain_threshold=2.0"),
    ({"hnsw_m": 32, "hnsw_ef_construction": 8}, "hnsw_ef_construction=8 must be >= hnsw_m=32"),
    ({"key_mode": "vibes"}, "key_mode='vibes'"),
])
def test_config_names_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        RetrieverConfig(**overrides)


def test_config_round_trips_and_refuses_unknown_fields():
    cfg = RetrieverConfig(index="ivf", top_k=5)
    assert RetrieverConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown RetrieverConfig field\(s\) \['colour'\]"):
        RetrieverConfig.from_dict({"colour": "red"})


def test_retune_changes_search_settings_without_rebuilding():
    import faiss

    x = clustered(300)
    hnsw = build_index(x, np.arange(300), RetrieverConfig(hnsw_ef_search=16), "hnsw")
    ivf = build_index(x, np.arange(300), RetrieverConfig(ivf_nlist=4, ivf_nprobe=1), "ivf")
    hnsw.retune(RetrieverConfig(hnsw_ef_search=200))
    ivf.retune(RetrieverConfig(ivf_nprobe=4))
    assert faiss.downcast_index(hnsw.faiss_index.index).hnsw.efSearch == 200
    assert faiss.downcast_index(ivf.faiss_index.index).nprobe == 4
