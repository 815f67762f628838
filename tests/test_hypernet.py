"""Text-to-LoRA hypernetworks L / M / S: batched shapes, checkpoints, and generated adapters in PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from generator.hypernet.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from generator.hypernet.config import HypernetConfig
from generator.hypernet.model import HYPERNETS, build_hypernet
from generator.spec import ModelSpec

VARIANTS = ["L", "M", "S"]
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMALL = dict(embed_dim=16, task_dim=8, pos_dim=4, hidden_dim=32, n_blocks=1)  # a 2-layer-scale hypernetwork


def small_net(spec, variant, targets=("q_proj", "v_proj"), rank=4, seed=0):
    torch.manual_seed(seed)
    return build_hypernet(HypernetConfig(spec=spec, variant=variant, target_modules=targets, rank=rank, **SMALL)).eval()


def task_embeddings(n, dim, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def assert_adapter_shapes(a, b, spec, targets, n, rank):
    assert sorted(a) == sorted(b) == sorted(targets)
    for m in targets:
        d_in, d_out = spec.shapes[m]
        assert a[m].shape == (n, spec.n_layers, rank, d_in), m
        assert b[m].shape == (n, spec.n_layers, d_out, rank), m
        assert torch.isfinite(a[m]).all() and torch.isfinite(b[m]).all()


def test_registry_has_the_three_sizes():
    assert sorted(HYPERNETS) == VARIANTS
    assert all(HYPERNETS[v].variant == v for v in VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_TARGETS], ids=["qv", "all"])
def test_batched_shapes_on_tiny(tiny_spec, variant, targets):
    net = small_net(tiny_spec, variant, targets, rank=3)
    with torch.no_grad():
        a, b = net(task_embeddings(5, 16))
    assert_adapter_shapes(a, b, tiny_spec, targets, n=5, rank=3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_equals_one_at_a_time(tiny_spec, variant):
    """N descriptions in one pass give the same adapters as N passes; different tasks give different adapters."""
    net = small_net(tiny_spec, variant)
    emb = task_embeddings(4, 16)
    with torch.no_grad():
        a, b = net(emb)
        for i in range(4):
            a1, b1 = net(emb[i:i + 1])
            for m in a:
                assert torch.allclose(a[m][i], a1[m][0], atol=1e-6) and torch.allclose(b[m][i], b1[m][0], atol=1e-6)
    assert (a["q_proj"][0] - a["q_proj"][1]).abs().max() > 1e-4
    assert (b["v_proj"][0] - b["v_proj"][1]).abs().max() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_layer_and_rank_gets_its_own_factors(tiny_spec, variant):
    net = small_net(tiny_spec, variant, ALL_TARGETS)
    with torch.no_grad():
        a, b = net(task_embeddings(1, 16))
    for m in ALL_TARGETS:
        assert (a[m][0, 0] - a[m][0, 1]).abs().max() > 1e-5  # layer 0 vs layer 1
        assert (a[m][0, 0, 0] - a[m][0, 0, 1]).abs().max() > 1e-5  # rank slice 0 vs 1
        assert (b[m][0, 0, :, 0] - b[m][0, 0, :, 1]).abs().max() > 1e-7


@pytest.mark.parametrize("variant", VARIANTS)
def test_hypernet_trains(tiny_spec, variant):
    """Gradients reach every parameter, and a few steps fit a target adapter better."""
    net = small_net(tiny_spec, variant).train()
    emb = task_embeddings(2, 16)
    target = {m: torch.randn_like(t) * 0.1 for m, t in net(emb)[0].items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        a, _ = net(emb)
        loss = sum(((a[m] - target[m]) ** 2).mean() for m in a)
        opt.zero_grad()
        loss.backward()
        if not losses:
            no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            # B's own head rows and gain cannot move an A-only loss; everything else must
            assert all(("heads" in n or "gain" in n) for n in no_grad), no_grad
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_refuses_wrong_embedding_width(tiny_spec):
    net = small_net(tiny_spec, "M")
    with pytest.raises(ValueError, match=r"task embeddings must be \(N, 16\), got \(2, 8\)"):
        net(torch.zeros(2, 8))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(variant="XL"), "variant must be one of"),
        (dict(rank=0), "rank must be >= 1"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(n_blocks=-1), "n_blocks must be >= 0"),
        (dict(target_modules=("lm_head",)), "unknown target module"),
        (dict(rank=4, base_rank=4), r"base_rank must be in \[0, rank=4\)"),
    ],
)
def test_config_validation(tiny_spec, fields, message):
    with pytest.raises(ValueError, match=message):
        HypernetConfig(spec=tiny_spec, **fields)


def test_config_dict_round_trip(tiny_spec):
    cfg = HypernetConfig(spec=tiny_spec, variant="S", target_modules=("v_proj", "down_proj"), rank=2,
                         extra={"mode": "recon"}, **SMALL)
    back = HypernetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match=r"unknown hypernetwork config field\(s\) \['colour'\]"):
        HypernetConfig.from_dict({**cfg.to_dict(), "colour": "red"})


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_network_holds_its_base_adapter_as_leading_ranks(tiny_spec, tmp_path, variant):
    """With base_rank, every adapter starts with the base adapter's ranks (B rescaled to the network's alpha /
    rank, so the base's delta is unchanged), then the generated ones; the base travels in the checkpoint."""
    torch.manual_seed(0)
    cfg = HypernetConfig(spec=tiny_spec, variant=variant, rank=6, alpha=12.0, base_rank=2, **SMALL)
    net = build_hypernet(cfg).eval()
    g = torch.Generator().manual_seed(1)
    base_a = {m: torch.randn(tiny_spec.n_layers, 2, tiny_spec.shapes[m][0], generator=g) for m in cfg.target_modules}
    base_b = {m: torch.randn(tiny_spec.n_layers, tiny_spec.shapes[m][1], 2, generator=g) for m in cfg.target_modules}
    net.set_base(base_a, base_b, scaling=4.0)  # the base adapter's own alpha / rank
    emb = task_embeddings(3, 16)
    with torch.no_grad():
        a, b = net(emb)
    assert_adapter_shapes(a, b, tiny_spec, cfg.target_modules, n=3, rank=6)
    for m in cfg.target_modules:
        assert torch.equal(a[m][:, :, :2], base_a[m].expand(3, -1, -1, -1))
        delta = (b[m][:, :, :, :2] @ a[m][:, :, :2]) * (cfg.alpha / cfg.rank)  # the base part at the net's scaling
        assert torch.allclose(delta, (base_b[m] @ base_a[m] * 4.0).expand(3, -1, -1, -1), atol=1e-5)
        assert not torch.equal(a[m][0, :, 2:], a[m][1, :, 2:])  # the generated ranks depend on the task
    save_checkpoint(net, tmp_path / "ck", dtype=torch.float32)
    back = load_checkpoint(tmp_path / "ck", tiny_spec)
    with torch.no_grad():
        a1, b1 = back(emb)
    assert all(torch.equal(a[m], a1[m]) and torch.equal(b[m], b1[m]) for m in a)
    with pytest.raises(ValueError, match="base adapter targets"):
        net.set_base({"q_proj": base_a["q_proj"]}, {"q_proj": base_b["q_proj"]}, 4.0)


# --- checkpoints --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_round_trip_is_exact_in_fp32(tiny_spec, tmp_path, variant):
    net = small_net(tiny_spec, variant, ("k_proj", "up_proj"))
    save_checkpoint(net, tmp_path / "ck", dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no pickle
    back = load_checkpoint(tmp_path / "ck", tiny_spec)
    assert back.cfg == net.cfg and not back.training
    emb = task_embeddings(3, 16)
    with torch.no_grad():
        (a0, b0), (a1, b1) = net(emb), back(emb)
    for m in a0:
        assert torch.equal(a0[m], a1[m]) and torch.equal(b0[m], b1[m])


def test_default_checkpoint_is_half_precision_and_stable(tiny_spec, tmp_path):
    net = small_net(tiny_spec, "L")
    save_checkpoint(net, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    save_checkpoint(back, tmp_path / "ck2")
    again = load_checkpoint(tmp_path / "ck2")
    emb = task_embeddings(2, 16)
    with torch.no_grad():
        (a0, _), (a1, _), (a2, _) = net(emb), back(emb), again(emb)
    assert torch.allclose(a0["q_proj"], a1["q_proj"], atol=1e-2)  # fp16 weights: close
    assert torch.equal(a1["q_proj"], a2["q_proj"])  # and re-saving loses nothing more


def test_checkpoint_for_other_shapes_names_both_models(tiny_spec, tmp_path):
    from test_spec import _configs

    save_checkpoint(small_net(tiny_spec, "M"), tmp_path / "ck")
    other = ModelSpec.from_hf_config(_configs()["qwen2"], "tiny-qwen2")  # 3 layers
    with pytest.raises(ValueError, match="tiny-llama.*tiny-qwen2|tiny-qwen2.*tiny-llama"):
        load_checkpoint(tmp_path / "ck", other)
    narrow = ModelSpec("narrow-llama", tiny_spec.n_layers, {**tiny_spec.shapes, "v_proj": (32, 8)})
    with pytest.raises(ValueError, match=r"tiny-llama.*narrow-llama.*v_proj"):
        load_checkpoint(tmp_path / "ck", narrow)
    # shapes outside the hypernetwork's targets do not matter
    other_mlp = ModelSpec("other-mlp", tiny_spec.n_layers, {**tiny_spec.shapes, "up_proj": (32, 99)})
    load_checkpoint(tmp_path / "ck", other_mlp)


def test_recorded_strength_is_the_held_out_best_and_generated_adapters_are_made_at_it(tiny_spec, tmp_path):
    """`training.strength --plain` records the strength with the lowest held-out loss SFT measured (never 0, the
    base model); adapters come out at it (alpha scaled, so plain PEFT gets it) and say so, and the weight they
    carry for prompts with examples is relative to that."""
    from generator.generate import T2LGenerator
    from training.strength import record_plain_strength

    net = small_net(tiny_spec, "M")
    net.cfg.extra = {"val_loss_by_strength": {"0.0": 0.5, "0.5": 2.0, "0.75": 1.9, "1.0": 1.95},
                     "strength_with_examples": 0.5}
    save_checkpoint(net, tmp_path / "ck", dtype=torch.float32)
    plain = T2LGenerator.from_checkpoint(tmp_path / "ck", None, tiny_spec)
    assert record_plain_strength(tmp_path / "ck") == 0.75
    gen = T2LGenerator.from_checkpoint(tmp_path / "ck", None, tiny_spec)
    emb = task_embeddings(1, 16)
    (full,), (made,) = plain.generate_embedded(emb, ["a task"]), gen.generate_embedded(emb, ["a task"])
    assert full.alpha == net.cfg.alpha and made.alpha == pytest.approx(0.75 * net.cfg.alpha)
    for m in full.a:
        assert torch.allclose(made.delta(m, 0), 0.75 * full.delta(m, 0), atol=1e-6)
    assert made.metadata["strength"] == "0.75" and "strength" not in full.metadata
    assert float(made.metadata["strength_with_examples"]) == pytest.approx(0.5 / 0.75, abs=1e-5)
    assert full.metadata["strength_with_examples"] == "0.5"

    net.cfg.extra = {}
    save_checkpoint(net, tmp_path / "none", dtype=torch.float32)
    with pytest.raises(SystemExit, match="val_loss_by_strength"):
        record_plain_strength(tmp_path / "none")


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_checkpoint_missing_file(tiny_spec, tmp_path, missing):
    save_checkpoint(small_net(tiny_spec, "S"), tmp_path / "ck")
    (tmp_path / "ck" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_checkpoint(tmp_path / "ck")


# --- SmolLM2 and the real encoder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_spec():
    from generator.config import load_spec

    return load_spec()


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_generator_makes_smollm2_adapters_in_one_batch(smollm2_spec, encoder, variant):
    """Full-size L/M/S for SmolLM2 (q, v, r=8): N descriptions -> N fitting, distinct adapters in one call."""
    from generator.generate import T2LGenerator

    gen = T2LGenerator.fresh(smollm2_spec, encoder, variant=variant)
    assert not gen.trained
    descriptions = ["Translate English sentences into French.", "Answer grade-school maths word problems.",
                    "Classify the sentiment of a movie review as positive or negative."]
    adapters = gen.generate(descriptions)
    assert len(adapters) == 3
    for ad, d in zip(adapters, descriptions, strict=True):
        ad.check_fits(smollm2_spec)
        ad.check_finite()
        assert (ad.rank, ad.target_modules, ad.base_model) == (8, ("q_proj", "v_proj"), smollm2_spec.name)
        assert ad.a["v_proj"].shape == (30, 8, 576) and ad.b["v_proj"].shape == (30, 192, 8)
        assert ad.metadata == {"description": d, "instruction": d, "generator": "t2l"}
    assert (adapters[0].b["q_proj"] - adapters[1].b["q_proj"]).abs().max() > 0


@pytest.mark.slow
def test_generated_adapter_loads_in_peft_and_changes_smollm2(smollm2, smollm2_copy, encoder, tmp_path):
    from peft import PeftModel
    from test_peft_io import TOL, injector_logits

    from generator.generate import T2LGenerator
    from generator.peft_io import load_peft, save_peft

    model, tok, spec = smollm2
    ck = save_checkpoint(T2LGenerator.fresh(spec, encoder, variant="M").net, tmp_path / "ck", dtype=torch.float32)
    gen = T2LGenerator.from_checkpoint(ck, encoder, spec)
    (adapter,) = gen.generate(["Answer every question like a pirate would."])
    save_peft(adapter, tmp_path / "ad")
    assert load_peft(tmp_path / "ad", spec).num_params() == spec.lora_params(["q_proj", "v_proj"], 8)

    ids = tok(["Tell me about the sea."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
        peft_model = PeftModel.from_pretrained(smollm2_copy[0], str(tmp_path / "ad")).eval()
        theirs = peft_model(ids).logits
    assert (theirs - base).abs().max() > 1e-3  # the generated adapter changes the model
    assert (injector_logits(copy.deepcopy(model), spec, adapter, ids) - theirs).abs().max() < TOL


@pytest.mark.slow
def test_shipped_generator_adapter_in_plain_peft_answers_an_unseen_sentiment_task(smollm2_copy, tmp_path):
    """The default checkpoint's adapter, loaded in plain PEFT, prompted the one way (its instruction in front of
    the input), labels reviews correctly where the base model with the same prompt rambles."""
    from peft import PeftModel

    from generator.config import GeneratorConfig, build_generator
    from generator.inference import generate_text
    from generator.peft_io import load_peft, save_peft
    from generator.prompt import task_prompt

    model, tok, spec = smollm2_copy
    gen = build_generator(GeneratorConfig(), spec)
    (adapter,) = gen.generate(["Classify the sentiment of product reviews as positive or negative."])
    save_peft(adapter, tmp_path / "ad")
    instruction = load_peft(tmp_path / "ad").metadata["instruction"]  # the sidecar carries it
    reviews = {"I love this blender, it crushes ice in seconds and is easy to clean.": "positive",
               "The charger stopped working after two days. Total waste of money.": "negative",
               "Terrible fit, the fabric ripped the first time I wore it.": "negative",
               "Great battery life and the screen is gorgeous. Would buy again!": "positive"}
    prompts = [task_prompt(tok, instruction, r) for r in reviews]
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "ad")).eval()
    answers = generate_text(peft_model, tok, prompts, max_new_tokens=8)
    assert [a.strip(" .").lower() for a in answers] == list(reviews.values())


def test_mismatch_draws_adapter_descriptions_from_nearest_other_tasks():
    """SFT's mismatch: a task's adapter description comes from one of its nearest other tasks (never itself);
    rate 0 changes nothing and draws no random numbers, so earlier recipes reproduce exactly."""
    import random

    from training.hypernet_train import mismatch, nearest_tasks

    # four tasks on two axes: a and b are near each other, c and d too
    pools = {"a": torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]]), "b": torch.tensor([[0.8, 0.2, 0.0]]),
             "c": torch.tensor([[0.0, 0.0, 1.0]]), "d": torch.tensor([[0.0, 0.1, 0.9], [0.0, 0.2, 0.8]])}
    names = list(pools)
    near = nearest_tasks(pools, names, 1)
    assert near == {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]}
    assert set(nearest_tasks(pools, names, 10)["a"]) == {"b", "c", "d"}  # k is capped at the other tasks

    rows = torch.stack([pools[n][0] for n in names])
    rng = random.Random(0)
    same, swapped = mismatch(rows, names, pools, near, 0.0, rng)
    assert swapped == 0 and torch.equal(same, rows) and rng.random() == random.Random(0).random()

    out, swapped = mismatch(rows, names, pools, near, 1.0, random.Random(0))
    assert swapped == 4 and torch.equal(rows, torch.stack([pools[n][0] for n in names]))  # input left as it was
    for k, n in enumerate(names):
        neighbour = near[n][0]
        assert any(torch.equal(out[k], r) for r in pools[neighbour])


# --- averaging runs (generator.hypernet.soup) ------------------------------------------------------------------

def _residual_nets(spec, seeds, variant="M"):
    """Residual networks with one base adapter, each initialised with its seed."""
    g = torch.Generator().manual_seed(7)
    targets = ("q_proj", "v_proj")
    base_a = {m: torch.randn(spec.n_layers, 2, spec.shapes[m][0], generator=g) for m in targets}
    base_b = {m: torch.randn(spec.n_layers, spec.shapes[m][1], 2, generator=g) for m in targets}
    nets = []
    for s in seeds:
        torch.manual_seed(s)
        net = build_hypernet(HypernetConfig(spec=spec, variant=variant, rank=6, alpha=12.0, base_rank=2, **SMALL))
        net.set_base(base_a, base_b, scaling=4.0)
        nets.append(net.eval())
    return nets


def _delta(a, b, scaling):
    return {m: (b[m] @ a[m]) * scaling for m in a}


def test_mean_of_hypernets_is_the_base_plus_the_mean_residual(tiny_spec):
    from generator.hypernet.soup import MeanOfHypernets

    nets = _residual_nets(tiny_spec, (1, 2, 3))
    mean = MeanOfHypernets(nets, weights=[1, 1, 2])
    assert mean.cfg.rank == 2 + 3 * 4 and mean.cfg.alpha / mean.cfg.rank == nets[0].cfg.alpha / nets[0].cfg.rank
    emb = task_embeddings(2, 16)
    s = nets[0].cfg.alpha / nets[0].cfg.rank
    with torch.no_grad():
        got = _delta(*mean(emb), s)
        parts = [_delta(*net(emb), s) for net in nets]
        a0, b0 = nets[0](emb)
        base = {m: (b0[m][..., :2] @ a0[m][:, :, :2]) * s for m in a0}
    for m in got:
        want = base[m] + sum(w * (p[m] - base[m]) for w, p in zip((0.25, 0.25, 0.5), parts, strict=True))
        assert torch.allclose(got[m], want, atol=1e-5)


def test_soup_averages_weights_and_refuses_what_cannot_be_averaged(tiny_spec):
    from generator.hypernet.soup import soup

    nets = _residual_nets(tiny_spec, (1, 1))
    with torch.no_grad():  # two runs from one initialisation, after different training
        for p in nets[1].parameters():
            p.add_(0.01 * torch.randn_like(p))
    avg = soup(nets)
    for k, v in avg.state_dict().items():
        assert torch.allclose(v, (nets[0].state_dict()[k] + nets[1].state_dict()[k]) / 2), k
    assert avg.cfg.extra["soup_of"] == 2 and avg.cfg.rank == nets[0].cfg.rank
    other = _residual_nets(tiny_spec, (1,), variant="L")[0]
    with pytest.raises(ValueError, match="another config"):
        soup([nets[0], other])
    moved = _residual_nets(tiny_spec, (1,))[0]
    moved.get_buffer("base_a_q_proj").add_(1.0)
    with pytest.raises(ValueError, match="base adapter"):
        soup([nets[0], moved])
    nets[1].cfg.extra = {"seed": 2}  # trained with --seed 2 and no --init-seed: another initialisation
    with pytest.raises(ValueError, match="different initialisations"):
        soup(nets)
    with pytest.raises(ValueError, match="weights must be"):
        soup(nets[:1], weights=[-1])


def test_base_adapter_of_a_residual_network_is_its_leading_ranks(tiny_spec):
    from generator.hypernet.soup import base_adapter

    net = _residual_nets(tiny_spec, (1,))[0]
    lora = base_adapter(net)
    assert lora.rank == 2 and lora.alpha / lora.rank == net.cfg.alpha / net.cfg.rank
    with torch.no_grad():
        a, b = net(task_embeddings(1, 16))
    for m in lora.a:
        assert torch.allclose(lora.b[m] @ lora.a[m], b[m][0, :, :, :2] @ a[m][0, :, :2], atol=1e-6)
    torch.manual_seed(0)
    plain = build_hypernet(HypernetConfig(spec=tiny_spec, variant="M", rank=4, **SMALL))
    with pytest.raises(ValueError, match="no base adapter"):
        base_adapter(plain)
