"""The `cvae` (ICM-LoRA) and `sg` (SG-LoRA) generators: library reader, priors, training, generation, checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generator.cvae.checkpoint import load_cvae, load_experts, save_cvae
from generator.cvae.generators import CVAEGenerator, SGGenerator
from generator.cvae.prior import expert_stats, gaussian_kl, semantic_prior
from generator.encoder import check_texts
from generator.generate import GENERATORS
from generator.library_data import library_embeddings, load_lora_library, sni_examples, write_library_task
from generator.lora import LoraAdapter
from generator.peft_io import load_peft, save_peft
from training.cvae import CVAETrainConfig, SGTrainConfig, tiny, train
from training.cvae_data import load_library_tensors

REPO = Path(__file__).resolve().parents[1]
N_TASKS, N_SNAPS, RANK = 6, 3, 2
KINDS = [("cvae", CVAEGenerator, CVAETrainConfig), ("sg", SGGenerator, SGTrainConfig)]


class HashEncoder:
    """A stand-in task encoder: a fixed random unit vector per text (no semantics, no model to load)."""

    name, dim, max_tokens = "hash-encoder", 16, 512

    def encode(self, texts, what: str = "description", batch_size: int = 64) -> torch.Tensor:
        rows = []
        for t in check_texts(texts, what):
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            rows.append(torch.randn(self.dim, generator=g))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)  # (N, dim)


def descriptions(i: int) -> list[str]:
    return [f"task {i} phrased {j}" for j in range(3)]


def make_library(root: Path, spec) -> Path:
    """N_TASKS tasks, N_SNAPS snapshots each: a shared A init plus task- and snapshot-specific drift, B per task."""
    g = torch.Generator().manual_seed(0)
    a0 = {m: 0.2 * torch.randn(spec.n_layers, RANK, spec.shapes[m][0], generator=g) for m in ("q_proj", "v_proj")}
    for i in range(N_TASKS):
        a_t = {m: a + 0.05 * torch.randn(a.shape, generator=g) for m, a in a0.items()}
        b_t = {m: 0.05 * torch.randn(spec.n_layers, spec.shapes[m][1], RANK, generator=g) for m in a0}
        snaps = [LoraAdapter(spec.name, RANK, 4.0, {m: a + 0.005 * k for m, a in a_t.items()},
                             {m: b + 0.001 * k for m, b in b_t.items()}) for k in range(N_SNAPS)]
        write_library_task(root, f"task{i:03d}", descriptions(i), snaps, loss=1.0, steps=10)
    return root


@pytest.fixture
def library(tmp_path, tiny_spec) -> Path:
    return make_library(tmp_path / "lib", tiny_spec)


@pytest.fixture
def embeddings(library, tmp_path) -> Path:
    path = tmp_path / "emb.safetensors"
    descs = {t.task: t.descriptions for t in load_lora_library(library)}
    library_embeddings(descs, path, HashEncoder)
    return path


def train_tiny(kind_cfg, library: Path, embeddings: Path, out: Path, steps: int = 30, **fields) -> Path:
    cfg = tiny(kind_cfg(library=str(library), out=str(out), embeddings=str(embeddings), steps=steps, **fields))
    return train(cfg)


# -- the library format ---------------------------------------------------------------------------------


def test_library_reader(library, tiny_spec):
    (library / "unfinished").mkdir()  # no meta.json: skipped
    lib = load_lora_library(library, tiny_spec)
    assert [t.task for t in lib] == [f"task{i:03d}" for i in range(N_TASKS)]
    t = lib[0]
    assert t.descriptions == descriptions(0) and t.n_snapshots == N_SNAPS
    assert t.snap_a["q_proj"].shape == (N_SNAPS, tiny_spec.n_layers, RANK, 32)
    assert t.snap_b["v_proj"].shape == (N_SNAPS, tiny_spec.n_layers, 16, RANK)
    assert torch.equal(t.snapshots()[-1].b["v_proj"], t.final.b["v_proj"])  # the final adapter is the last one


def test_library_reader_names_a_bad_snapshot_file(library):
    from safetensors.torch import save_file

    save_file({"q_proj.A": torch.zeros(2, 3)}, str(library / "task001" / "snapshots.safetensors"))
    with pytest.raises(ValueError, match="task001.*q_proj.A"):
        load_lora_library(library)


# -- the priors, by hand ---------------------------------------------------------------------------------


def test_semantic_prior_matches_hand_computation():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # experts' description embeddings
    means = torch.tensor([[1.0], [10.0], [3.0]])
    variances = torch.tensor([[0.5], [9.0], [0.25]])
    query = torch.tensor([[2.0, 0.0]])  # cosine 1, 0, 0.6 -> top 2: experts 0 and 2
    p = semantic_prior(query, keys, means, variances, top_k=2, temperature=0.5)
    w0 = 1.0 / (1.0 + math.exp(-(1.0 - 0.6) / 0.5))  # softmax([1, 0.6] / 0.5)
    w2 = 1.0 - w0
    mu = w0 * 1.0 + w2 * 3.0
    var = (w0 * 0.5 + w2 * 0.25) + (w0 * (1.0 - mu) ** 2 + w2 * (3.0 - mu) ** 2)
    assert p.index.tolist() == [[0, 2]]
    assert p.weights[0].tolist() == pytest.approx([w0, w2], abs=1e-6)
    assert (w0, mu, var) == pytest.approx((0.6899744811, 1.6200510378, 1.2781324), abs=1e-6)
    assert p.mean.item() == pytest.approx(mu, abs=1e-6) and p.var.item() == pytest.approx(var, abs=1e-6)
    loo = semantic_prior(query, keys, means, variances, top_k=2, temperature=0.5, exclude=torch.tensor([0]))
    assert loo.index.tolist() == [[2, 1]]  # expert 0 left out


def test_expert_stats_and_kl_by_hand():
    mu = torch.tensor([[0.0], [2.0], [5.0]])
    logvar = torch.log(torch.tensor([[1.0], [1.0], [0.5]]))
    mean, var = expert_stats(mu, logvar, torch.tensor([0, 0, 1]), 2)
    assert mean.flatten().tolist() == [1.0, 5.0]
    assert var.flatten().tolist() == pytest.approx([1.0 + 1.0, 0.5])  # mean within var + spread of the means
    kl = gaussian_kl(torch.tensor([[1.0]]), torch.zeros(1, 1), torch.tensor([[0.0]]), torch.tensor([[2.0]]))
    assert kl.item() == pytest.approx(0.5 * (math.log(2.0) + (1.0 + 1.0) / 2.0 - 1.0))
    assert gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0


# -- training and generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,gen_cls,cfg_cls", KINDS, ids=[k[0] for k in KINDS])
def test_trains_and_generates_peft_loadable_adapters(kind, gen_cls, cfg_cls, library, embeddings, tmp_path,
                                                     tiny_spec, tiny_model):
    ckpt = train_tiny(cfg_cls, library, embeddings, tmp_path / kind, steps=40)
    assert {p.name for p in ckpt.iterdir()} >= {"cvae.json", "cvae.safetensors", "report.json", "train_log.json"}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in ckpt.iterdir())
    assert json.loads((ckpt / "cvae.json").read_text())["kind"] == kind
    log = json.loads((ckpt / "train_log.json").read_text())
    assert sum(s["recon"] for s in log[-5:]) < sum(s["recon"] for s in log[:5])  # it learns
    gen = GENERATORS[kind].from_checkpoint(ckpt, HashEncoder(), tiny_spec)
    assert isinstance(gen, gen_cls) and gen.trained
    adapters = gen.generate(["reverse the words of a sentence", descriptions(1)[0]])
    for ad in adapters:
        assert ad.rank == RANK and ad.alpha == 4.0
        assert ad.a["q_proj"].shape == (2, RANK, 32) and ad.b["v_proj"].shape == (2, 16, RANK)
        ad.check_fits(tiny_spec)
    out = save_peft(adapters[0], tmp_path / "adapter")
    back = load_peft(out, tiny_spec)
    assert torch.equal(back.b["v_proj"], adapters[0].b["v_proj"])
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_model, str(out))
    loaded = peft_model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    assert torch.allclose(loaded, adapters[0].b["v_proj"][1])


@pytest.mark.parametrize("kind,gen_cls,cfg_cls", KINDS, ids=[k[0] for k in KINDS])
def test_sampling_is_deterministic_for_a_seed(kind, gen_cls, cfg_cls, library, embeddings, tmp_path, tiny_spec):
    ckpt = train_tiny(cfg_cls, library, embeddings, tmp_path / kind, steps=5)
    gen = gen_cls.from_checkpoint(ckpt, HashEncoder(), tiny_spec)
    d = ["sort a list of numbers", descriptions(2)[1]]

    def first_a(**kw):
        return [x.a["q_proj"] for x in gen.generate_adapters(d, **kw)]

    mean1, mean2 = first_a(), first_a(mode="mean")
    s1, s1_again, s2 = first_a(mode="sample", seed=1), first_a(mode="sample", seed=1), first_a(mode="sample", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(mean1, mean2, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(s1, s1_again, strict=True))
    assert not torch.allclose(s1[0], s2[0]) and not torch.allclose(s1[0], mean1[0])
    alone = gen.generate_adapters(d[1:], mode="sample", seed=1)[0].a["q_proj"]
    assert torch.allclose(alone, s1[1], atol=1e-6)  # a sample depends on (description, seed), not on the batch


def test_sg_checkpoint_carries_its_experts_and_works_zero_shot(library, embeddings, tmp_path, tiny_spec):
    ckpt = train_tiny(SGTrainConfig, library, embeddings, tmp_path / "sg", steps=10, top_k=3, temperature=0.2)
    bank = load_experts(ckpt)
    assert bank.tasks == [f"task{i:03d}" for i in range(N_TASKS)] and (bank.top_k, bank.temperature) == (3, 0.2)
    assert bank.emb.shape == (N_TASKS, HashEncoder.dim) and bank.mean.shape == bank.var.shape
    assert (bank.var > 0).all()
    gen = SGGenerator.from_checkpoint(ckpt, HashEncoder(), tiny_spec, top_k=2)
    (nb,) = gen.neighbours([descriptions(4)[0]])
    assert len(nb) == 2 and sum(w for _, w in nb) == pytest.approx(1.0)
    assert gen.generate(["a brand-new task nobody trained on"])[0].num_params() == tiny_spec.lora_params(
        ("q_proj", "v_proj"), RANK)
    with pytest.raises(FileNotFoundError, match="not an SG checkpoint"):
        SGGenerator.from_checkpoint(train_tiny(CVAETrainConfig, library, embeddings, tmp_path / "c", steps=2),
                                    HashEncoder(), tiny_spec)


def test_checkpoint_round_trip_and_precomputed_embeddings(library, embeddings, tmp_path, tiny_spec):
    ckpt = train_tiny(SGTrainConfig, library, embeddings, tmp_path / "sg", steps=5)
    net = load_cvae(ckpt, tiny_spec)
    exact = save_cvae(net, tmp_path / "fp32", load_experts(ckpt), dtype=torch.float32)
    again = load_cvae(exact, tiny_spec)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    assert torch.equal(load_experts(exact).mean, load_experts(ckpt).mean)
    # the lead's eval path: no encoder, precomputed embeddings straight into factors
    gen = SGGenerator.from_checkpoint(exact, None, tiny_spec)
    emb = HashEncoder().encode(["count the vowels"])
    a, b = gen.factors(emb)
    ref = SGGenerator.from_checkpoint(exact, HashEncoder(), tiny_spec).generate(["count the vowels"])[0]
    assert torch.equal(a["q_proj"][0], ref.a["q_proj"]) and b["v_proj"].shape == (1, 2, 16, RANK)
    other = type(tiny_spec)(name="other", n_layers=3, shapes=tiny_spec.shapes)
    with pytest.raises(ValueError, match="not other: tiny-llama has 2 layers"):
        load_cvae(ckpt, other)


def test_examples_condition_and_reconstruction(library, embeddings, tmp_path, tiny_spec):
    data_dir = tmp_path / "sni" / "tasks"
    data_dir.mkdir(parents=True)
    for i in range(N_TASKS):
        ex = [{"input": f"in {i}.{j}", "output": f"out {i}.{j}"} for j in range(2)]
        (data_dir / f"task{i:03d}.json").write_text(json.dumps({"positive_examples": ex}))
    emb = tmp_path / "emb_ex.safetensors"
    lib = load_lora_library(library)
    library_embeddings({t.task: t.descriptions for t in lib}, emb, HashEncoder,
                       sni_examples(tmp_path / "sni", [t.task for t in lib]))
    data = load_library_tensors(library, emb, data=tmp_path / "sni")
    assert data.has_examples and data.examples.shape == (N_TASKS, HashEncoder.dim)
    cfg = tiny(CVAETrainConfig(library=str(library), out=str(tmp_path / "cv"), embeddings=str(emb),
                               data=str(tmp_path / "sni"), steps=5))
    gen = CVAEGenerator.from_checkpoint(train(cfg, data), HashEncoder(), tiny_spec)
    d = [descriptions(0)[0]]
    plain = gen.generate_adapters(d)[0]
    assert torch.equal(gen.generate_adapters(d, examples=[[]])[0].a["q_proj"], plain.a["q_proj"])
    with_ex = gen.generate_adapters(d, examples=[["Input: in 0.0\nOutput: out 0.0"]])[0]
    assert not torch.allclose(with_ex.b["q_proj"], plain.b["q_proj"])
    rec = gen.reconstruct([lib[0].final], d)[0]
    assert rec.a["v_proj"].shape == lib[0].final.a["v_proj"].shape


def test_registered_and_fresh_generators(tiny_spec):
    from generator.config import GeneratorConfig

    assert {"t2l", "cvae", "sg"} <= set(GENERATORS)
    assert GeneratorConfig(generator="sg").generator == "sg"
    for cls in (CVAEGenerator, SGGenerator):
        gen = cls.fresh(tiny_spec, HashEncoder(), size="tiny", rank=RANK)
        (ad,) = gen.generate(["anything"])
        assert not gen.trained and ad.a["q_proj"].shape == (2, RANK, 32)
        assert ad.b["q_proj"].abs().max() < 1e-2  # an untrained generator stays near the identity


def test_module_entry_point_runs_without_typer(library, embeddings, tmp_path):
    out = tmp_path / "sg-cli"
    code = ("import runpy, sys; sys.modules['typer'] = None; "
            f"sys.argv = ['x', '--kind', 'sg', '--library', {str(library)!r}, '--embeddings', {str(embeddings)!r}, "
            f"'--out', {str(out)!r}, '--tiny', '--steps', '3']; runpy.run_module('training.cvae', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "experts.safetensors").is_file()
    assert json.loads((out / "report.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_cli_train_and_generate_with_real_embedder(library, tmp_path, encoder, tiny_spec):
    """`hyperlora train cvae|sg --tiny`, then `hyperlora generate --generator cvae|sg` on the tiny base model."""
    from conftest import tiny_llama_config
    from typer.testing import CliRunner

    from hyperlora import app

    emb = tmp_path / "emb.safetensors"
    library_embeddings({t.task: t.descriptions for t in load_lora_library(library)}, emb, lambda: encoder)
    base = tmp_path / "tiny-base"
    tiny_llama_config().save_pretrained(base)
    runner = CliRunner()
    for kind in ("cvae", "sg"):
        ckpt = tmp_path / f"ckpt-{kind}"
        res = runner.invoke(app, ["train", kind, "--library", str(library), "--out", str(ckpt), "--embeddings",
                                  str(emb), "--tiny", "--steps", "3"])
        assert res.exit_code == 0, res.output
        assert "% of the library's final adapters" in res.output
        res = runner.invoke(app, ["generate", "extract the dates from a text", "--generator", kind, "--checkpoint",
                                  str(ckpt), "--base-model", str(base), "--out", str(tmp_path / f"ad-{kind}")])
        assert res.exit_code == 0, res.output
        assert load_peft(tmp_path / f"ad-{kind}", tiny_spec).rank == RANK


@pytest.mark.parametrize("field,value", [("size", "huge"), ("cond_dropout", 1.0), ("steps", 0), ("beta", -1.0)])
def test_train_config_names_a_bad_value(field, value):
    with pytest.raises(ValueError, match=field):
        CVAETrainConfig(**{field: value})
    with pytest.raises(ValueError, match="top_k"):
        SGTrainConfig(top_k=0)
