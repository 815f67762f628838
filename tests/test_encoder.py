"""The task encoder and descriptions that are bad input: empty, whitespace, not text, too long."""

from __future__ import annotations

import warnings

import pytest
import torch

from generator.encoder import check_texts

EMPTY = ["", "   ", "\n\t "]


@pytest.mark.parametrize("text", EMPTY)
def test_empty_description_is_refused(text):
    with pytest.raises(ValueError, match="description #0 is empty or whitespace: give a sentence"):
        check_texts([text])


def test_check_texts_names_the_offender_and_strips():
    assert check_texts(["  Summarise news.  "]) == ["Summarise news."]
    assert check_texts("one string") == ["one string"]
    with pytest.raises(ValueError, match="description #2 is empty"):
        check_texts(["a", "b", " "])
    with pytest.raises(ValueError, match="no description given"):
        check_texts([])
    with pytest.raises(ValueError, match="input #1 is int, expected a string"):
        check_texts(["a", 3], what="input")


@pytest.mark.slow
def test_encoder_gives_unit_vectors(encoder):
    assert encoder.dim == 384 and encoder.max_tokens == 256
    emb = encoder.encode(["Translate to German.", "Solve maths problems.", "Translate into German."])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 2] > sims[0, 1]  # paraphrases are closer than different tasks


@pytest.mark.slow
@pytest.mark.parametrize("text", EMPTY)
def test_encoder_refuses_empty(encoder, text):
    with pytest.raises(ValueError, match="empty or whitespace"):
        encoder.encode(["fine", text])


@pytest.mark.slow
def test_long_description_is_truncated_with_a_warning(encoder):
    long = "Rewrite the user's paragraph in formal English, keeping every fact. " * 60  # ~900 tokens
    with pytest.warns(UserWarning, match=r"exceed the embedder's 256-token window and were truncated"):
        emb = encoder.encode([long, "short"])
    assert emb.shape == (2, 384)
    # what was embedded is the first window: text past it changes nothing
    with pytest.warns(UserWarning, match="truncated"):
        longer = encoder.encode([long + " Also translate everything into Japanese."])
    assert torch.allclose(emb[0], longer[0], atol=1e-5)


@pytest.mark.slow
def test_short_description_gives_no_warning(encoder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["Answer trivia questions."])


@pytest.mark.slow
def test_generator_refuses_bad_descriptions(encoder, tiny_spec):
    from generator.generate import T2LGenerator

    gen = T2LGenerator.fresh(tiny_spec, encoder, variant="S", hidden_dim=32)
    with pytest.raises(ValueError, match="description #1 is empty or whitespace"):
        gen.generate(["Summarise articles.", "  "])
    with pytest.raises(ValueError, match="no description given"):
        gen.generate([])
    (one,) = gen.generate("A lone string is one description.")
    assert one.metadata["description"] == "A lone string is one description."


@pytest.mark.slow
def test_generator_refuses_an_encoder_of_another_width(encoder, tiny_spec):
    from generator.generate import T2LGenerator
    from generator.hypernet.config import HypernetConfig
    from generator.hypernet.model import build_hypernet

    net = build_hypernet(HypernetConfig(spec=tiny_spec, embed_dim=768, embedder="some-768-d-model"))
    with pytest.raises(ValueError, match="expects 768-d task embeddings .* gives 384-d"):
        T2LGenerator(net, encoder)


@pytest.mark.slow
def test_fresh_generator_is_reproducible_and_leaves_the_global_rng_alone(encoder, tiny_spec):
    from generator.generate import T2LGenerator

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = T2LGenerator.fresh(tiny_spec, encoder, variant="L", hidden_dim=32).generate(["Write haiku."])[0]
    assert torch.equal(torch.rand(3), expected)
    second = T2LGenerator.fresh(tiny_spec, encoder, variant="L", hidden_dim=32).generate(["Write haiku."])[0]
    assert torch.equal(first.a["q_proj"], second.a["q_proj"])


def test_fast_mean_pooling_matches_sentence_transformers(encoder):
    """The default MiniLM is loaded without sentence-transformers and embeds exactly as SentenceTransformer does."""
    from generator.mean_pooling import MeanPoolingModel
    from generator.models import load_embedder

    assert isinstance(encoder.model, MeanPoolingModel) and encoder._plain is not None
    st = load_embedder()
    assert (encoder.dim, encoder.max_tokens) == (st.get_embedding_dimension(), st.max_seq_length)
    texts = ["Classify the sentiment.", "Translate English sentences into French, keeping names as they are. " * 3,
             "x", "word " * 400]  # the last one is truncated to the window
    with pytest.warns(UserWarning, match="exceed the embedder's 256-token window"):
        ours = encoder.encode(texts, batch_size=2)  # two batches, with padding
    ref = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False).float()
    assert torch.allclose(ours, ref, atol=1e-5)


def test_the_default_encoder_needs_no_sentence_transformers():
    """The Router and Generator replicas start without importing it (and scikit-learn, SciPy behind it), nor
    transformers (its modeling code is ~2.5 s of CPU per replica): the MiniLM runs as generator/bert.py."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from generator.encoder import TaskEncoder; e = TaskEncoder.load(); "
            "print(tuple(e.encode(['hi']).shape), 'sentence_transformers' in sys.modules, 'sklearn' in sys.modules, "
            "'transformers' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
    assert out.split()[-5:] == ["(1,", "384)", "False", "False", "False"]


def test_plain_bert_tokens_and_states_match_transformers():
    """generator/bert.py against transformers' AutoTokenizer and AutoModel on the real MiniLM: the same ids (accents,
    CJK, emoji, whitespace, truncation, padding) and the same hidden states at every real token."""
    from transformers import AutoModel, AutoTokenizer

    from generator.bert import PlainBert, load_plain_bert
    from generator.models import resolve_embedder

    path = resolve_embedder()
    model, tok = load_plain_bert(path)
    assert isinstance(model, PlainBert)
    hf, hf_tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = ["Hello world!", "Ünïcödé café naïve 東京 🙂 tabs\tand  spaces", "word " * 300, ""]
    assert tok(texts)["input_ids"] == hf_tok(texts)["input_ids"]
    ours = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ref = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    with torch.no_grad():
        a, b = model(**ours).last_hidden_state, hf(**ref).last_hidden_state  # (4, 256, 384)
    real = ref["attention_mask"].bool()
    assert torch.allclose(a[real], b[real], atol=1e-4)


@pytest.mark.parametrize("change", [{"hidden_act": "gelu_new"}, {"model_type": "roberta"},
                                    {"position_embedding_type": "relative_key"}])
def test_plain_bert_leaves_other_models_to_transformers(tmp_path, change):
    import json
    import shutil

    from generator.bert import load_plain_bert
    from generator.models import resolve_embedder

    src = resolve_embedder()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(src / name, tmp_path / name)
    assert load_plain_bert(tmp_path) is not None
    config = json.loads((src / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_plain_bert(tmp_path) is None


def test_other_sentence_transformers_models_load_with_it(tmp_path):
    """A directory that is not exactly Transformer -> mean Pooling (-> Normalize), without prompts or lower-casing,
    is left to sentence-transformers, and its pooling is checked there too."""
    import json
    import shutil

    from generator.encoder import _plain_mean_pooling
    from generator.mean_pooling import mean_pooling_settings
    from generator.models import load_embedder, resolve_embedder

    src = resolve_embedder()
    assert mean_pooling_settings(src) == (256, 384)
    changes = {"1_Pooling/config.json": {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True},
               "sentence_bert_config.json": {"do_lower_case": True},
               "config_sentence_transformers.json": {"prompts": {"query": "query: "}}}
    for name, change in changes.items():
        d = tmp_path / name.replace("/", "-")
        shutil.copytree(src, d)
        (d / name).write_text(json.dumps({**json.loads((d / name).read_text()), **change}))
        assert mean_pooling_settings(d) is None, name
    (tmp_path / "bare").mkdir()
    assert mean_pooling_settings(tmp_path / "bare") is None
    st = load_embedder()
    pooling = st[1]
    cfg = pooling.get_config_dict()
    pooling.get_config_dict = lambda: {**cfg, "pooling_mode": "cls"}
    try:
        assert _plain_mean_pooling(st) is None
    finally:
        del pooling.get_config_dict
