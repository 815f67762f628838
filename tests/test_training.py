"""Offline jobs end to end on a tiny random Llama (CPU), plus the metric and loss code they rely on."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from training.data import DEFAULT_DATA, Example, answer_loss, load_split, split_instances
from training.metrics import exact_match, rouge_l

pytestmark = pytest.mark.skipif(not (DEFAULT_DATA / "manifest.json").exists(), reason="needs ../shared/data/sni")
runner = CliRunner()


def test_rouge_l_matches_known_values():
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 1, R = 0.5, F = 2/3.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    assert rouge_l("positive", ["Negative", "positive"]) == pytest.approx(100.0)
    assert rouge_l("blue", ["red"]) == 0.0


def test_exact_match_normalises_case_and_punctuation():
    assert exact_match("Yes.", ["yes"]) == 100.0
    assert exact_match("yes it is", ["yes"]) == 0.0


def test_split_is_deterministic_and_last_fifth_is_test():
    items = [Example(str(i), [str(i)]) for i in range(50)]
    train, test = split_instances(items)
    assert [e.input for e in test] == [str(i) for i in range(40, 50)] and len(train) == 40
    a, b = load_split("dev", limit=2), load_split("dev", limit=2)
    assert [e.input for e in a[0].test] == [e.input for e in b[0].test]


def test_answer_loss_equals_full_logits_cross_entropy(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 5:8], labels[1, 3:9], labels[2, 8] = ids[0, 5:8], ids[1, 3:9], ids[2, 8]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = tiny_model(input_ids=ids).logits[:, :-1]
    ref = torch.stack([torch.nn.functional.cross_entropy(logits[i], labels[i, 1:], ignore_index=-100)
                       for i in range(3)]).mean()
    assert answer_loss(tiny_model, batch).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _invoke(args):
    from hyperlora import app

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_lora_library_trains_then_resumes_without_retraining(work):
    lib = work / "lora-library"
    out = _invoke(["train", "lora-library", "--tiny", "--out", str(lib)])
    assert "trained 3 task LoRA(s)" in out
    tasks = sorted(p.name for p in lib.iterdir() if not p.name.startswith("."))
    assert len(tasks) == 3
    for t in tasks:
        for f in ("adapter_config.json", "adapter_model.safetensors", "meta.json", "snapshots.safetensors"):
            assert (lib / t / f).is_file()
        assert json.loads((lib / t / "meta.json").read_text())["task"] == t
    stamps = {t: (lib / t / "adapter_model.safetensors").stat().st_mtime_ns for t in tasks}
    (lib / tasks[1] / "meta.json").unlink()  # as if the job had been killed before this task finished
    out = _invoke(["train", "lora-library", "--tiny", "--out", str(lib)])
    assert "trained 1 task LoRA(s)" in out
    assert (lib / tasks[1] / "meta.json").is_file()
    for t in (tasks[0], tasks[2]):
        assert (lib / t / "adapter_model.safetensors").stat().st_mtime_ns == stamps[t]
    assert "already done" in _invoke(["train", "lora-library", "--tiny", "--out", str(lib)])


def test_library_adapters_load_in_peft(work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from generator.models import hyperlora_home

    lib = work / "lora-library"
    task = sorted(p for p in lib.iterdir() if not p.name.startswith("."))[0]
    base = AutoModelForCausalLM.from_pretrained(hyperlora_home() / "tiny-llama")
    model = PeftModel.from_pretrained(base, task)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_multitask_and_hypernet_jobs_write_checkpoints(work):
    _invoke(["train", "multitask-lora", "--tiny", "--out", str(work / "multitask")])
    assert (work / "multitask" / "adapter_model.safetensors").is_file()
    emb = str(work / "emb.safetensors")
    for mode in ("recon", "sft"):
        _invoke(["train", "hypernet", "--tiny", "--mode", mode, "--out", str(work / f"t2l-{mode}"),
                 "--library", str(work / "lora-library"), "--embeddings", emb])
        cfg = json.loads((work / f"t2l-{mode}" / "hypernet.json").read_text())
        assert cfg["extra"]["mode"] == mode and (work / f"t2l-{mode}" / "hypernet.safetensors").is_file()


def test_sft_early_stopping_holds_out_tasks_and_keeps_the_best_step(work):
    out = work / "val" / "t2l-sft"
    _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(out), "--steps", "4", "--val-tasks", "1",
             "--eval-every", "2", "--embeddings", str(work / "emb.safetensors")])
    extra = json.loads((out / "hypernet.json").read_text())["extra"]
    last = load_split("train", limit=3)[-1].name  # every second of the last 2 * val_tasks: the last one
    assert extra["val_tasks"] == [last] and extra["train_tasks"] == 2
    steps = [s for s, _ in extra["val_curve"]]
    assert steps == [0, 2, 4]  # step 0 (the untrained network) is a candidate too
    curve = dict(extra["val_curve"])
    assert curve[extra["best_step"]] == min(curve.values())  # the kept step has the lowest (rounded) loss
    assert extra["best_val_loss"] == pytest.approx(min(curve.values()), abs=1e-4)


def test_residual_sft_on_a_held_out_multitask_lora(work):
    """`multitask-lora --holdout 1` leaves out the task SFT validates on; `hypernet --base-adapter` makes every
    adapter hold that LoRA as its leading ranks, with step 0 (the LoRA alone) among the validated steps."""
    from generator.hypernet.checkpoint import load_checkpoint
    from generator.peft_io import load_peft

    base = work / "res" / "multitask-holdout"
    _invoke(["train", "multitask-lora", "--tiny", "--out", str(base), "--holdout", "1"])
    meta = json.loads((base / "meta.json").read_text())
    last = load_split("train", limit=3)[-1].name
    assert meta["excluded"] == [last] and last not in meta["tasks"] and len(meta["tasks"]) == 2
    out = work / "res" / "t2l-res"
    _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(out), "--steps", "2", "--val-tasks", "1",
             "--eval-every", "2", "--base-adapter", str(base), "--embeddings", str(work / "emb.safetensors")])
    net = load_checkpoint(out)
    lora = load_peft(base)
    assert net.cfg.base_rank == lora.rank and net.cfg.rank == 2 * lora.rank
    assert net.cfg.extra["val_tasks"] == [last] and [s for s, _ in net.cfg.extra["val_curve"]][0] == 0
    with torch.no_grad():
        a, _ = net(torch.nn.functional.normalize(torch.randn(2, net.cfg.embed_dim), dim=-1))
    for m in lora.target_modules:  # the fixed ranks are the LoRA's A (fp16 in the checkpoint)
        assert torch.allclose(a[m][:, :, : lora.rank], lora.a[m].expand(2, -1, -1, -1), atol=1e-3)
    from training.variants import summarise

    row = summarise(work / "res")["t2l-res"]  # what the GPU jobs write to variants.json
    assert row["base_adapter"] == str(base) and row["best_val_loss"] == net.cfg.extra["best_val_loss"]


def test_sft_data_parallel_on_ray_train(work):
    pytest.importorskip("ray.train.torch")
    from generator.hypernet.checkpoint import load_checkpoint

    out = work / "ray" / "t2l-sft"
    _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(out), "--steps", "3", "--ray-workers", "2",
             "--embeddings", str(work / "emb.safetensors")])
    net = load_checkpoint(out)
    assert net.cfg.extra["workers"] == 2 and net.cfg.extra["mode"] == "sft"
    fresh = json.loads((work / "t2l-sft" / "hypernet.json").read_text())["extra"]
    assert fresh["workers"] == 1


def test_eval_quality_writes_table_plot_and_command(work):
    out = work / "results"
    printed = _invoke(["eval", "quality", "--tiny", "--work", str(work), "--out", str(out),
                       "--embeddings", str(work / "emb.safetensors")])
    q = json.loads((out / "quality.json").read_text())
    dev = q["results"]["dev"]
    for row in ("base", "base + instruction", "2-shot ICL", "multi-task LoRA + instruction",
                "multi-task LoRA + instruction + 2 examples", "t2l-sft + instruction",
                "t2l-sft + instruction + 2 examples", "t2l-recon [definition] + instruction"):
        assert dev[row]["tasks"] == 3 and 0.0 <= dev[row]["rougeL"] <= 100.0
        lo, hi = dev[row]["rougeL_ci"]
        assert lo <= dev[row]["rougeL"] <= hi
    assert dev["t2l-sft + instruction"]["reference"] == "base + instruction"
    assert dev["t2l-sft + instruction + 2 examples"]["reference"] == "2-shot ICL"
    assert set(dev["t2l-sft + instruction"]["delta"]) == set(dev["base"]["per_task"])
    assert {"oracle LoRA + instruction", "t2l-recon + instruction"} <= set(q["results"]["train"])
    assert q["command"].startswith("hyperlora eval quality")
    assert (out / "quality.md").read_text().startswith("Produced by: `hyperlora eval quality")
    assert (out / "quality.png").stat().st_size > 1000
    assert "2-shot ICL" in printed


def test_sft_moving_average_and_snapshots(work):
    """`--ema d` saves the exponential moving average of the weights: the same run without it, snapshotted after
    every step, averaged by hand (the first step copies, then ema = d * ema + (1 - d) * w), gives the same net."""
    from generator.hypernet.checkpoint import load_checkpoint
    from training.hypernet_train import snapshot_dir

    emb = str(work / "emb.safetensors")
    plain, avg = work / "ema" / "t2l-plain", work / "ema" / "t2l-avg"
    _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(plain), "--steps", "3",
             "--snapshot-steps", "1,2,3", "--embeddings", emb])
    _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(avg), "--steps", "3", "--ema", "0.5",
             "--snapshot-steps", "2", "--embeddings", emb])
    steps = [load_checkpoint(snapshot_dir(plain, s)).state_dict() for s in (1, 2, 3)]
    assert load_checkpoint(snapshot_dir(plain, 2)).cfg.extra["snapshot_step"] == 2
    got, mid = load_checkpoint(avg).state_dict(), load_checkpoint(snapshot_dir(avg, 2)).state_dict()
    moved = 0
    for k, w3 in steps[2].items():
        by_hand = 0.5 * steps[0][k] + 0.5 * steps[1][k]  # after step 2
        assert torch.allclose(mid[k], by_hand, atol=2e-3, rtol=2e-3), k
        assert torch.allclose(got[k], 0.5 * by_hand + 0.5 * w3, atol=2e-3, rtol=2e-3), k
        moved += int(not torch.allclose(got[k], w3, atol=1e-4))
    assert moved > 0  # the average is not the last step's weights
    assert json.loads((avg / "hypernet.json").read_text())["extra"]["ema"] == 0.5


def test_sft_mismatch_and_example_rate_are_recorded(work):
    out = work / "mm" / "t2l-sft"
    _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(out), "--steps", "2", "--val-tasks", "1",
             "--mismatch-rate", "0.5", "--example-rate", "0.5", "--embeddings", str(work / "emb.safetensors")])
    extra = json.loads((out / "hypernet.json").read_text())["extra"]
    assert extra["mismatch_rate"] == 0.5 and extra["mismatch_neighbours"] == 8 and extra["example_rate"] == 0.5
    from hyperlora import app

    bad = runner.invoke(app, ["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(work / "x"),
                                 "--mismatch-rate", "1.5"])
    assert bad.exit_code == 2 and "mismatch_rate must be in [0, 1]" in bad.output


def test_sft_trains_on_relabelled_copies_of_trained_tasks_only(work):
    out = work / "rl" / "t2l-sft"
    _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(out), "--steps", "2", "--val-tasks", "1",
             "--relabel-copies", "2", "--limit-tasks", "8", "--embeddings", str(work / "emb.safetensors")])
    extra = json.loads((out / "hypernet.json").read_text())["extra"]
    copies = extra["relabelled_tasks"]
    assert extra["relabel_copies"] == 2 and copies  # the first tiny train task (Yes./No.) qualifies
    assert extra["train_tasks"] == 8 - 1 + len(copies)  # the first 8 train tasks, 1 held out
    assert not any(c.startswith(v + "::") for c in copies for v in extra["val_tasks"])  # held out: never its copies
    # the held-out task (task065, 'Option 1'/'Option 2') qualifies: its relabelled copy is watched at every check
    assert [s for s, _ in extra["val_relabelled_curve"]] == [s for s, _ in extra["val_curve"]]
    assert set(extra["val_relabelled_by_strength"]) == {"0.0", "0.75", "1.0"}
    from hyperlora import app

    bad = runner.invoke(app, ["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(work / "x"),
                              "--relabel-copies", "-1"])
    assert bad.exit_code == 2 and "relabel_copies must be >= 0" in bad.output


def test_runs_of_one_initialisation_average_into_a_soup(work):
    """Two residual SFT runs with `--init-seed 0` and different sampling seeds differ, and `training.average` scores
    the base adapter alone, each run, their weight average (saved as a loadable checkpoint) and the mean of their
    adapters on the held-out task's train and test portions; runs from two initialisations get no soup."""
    from generator.hypernet.checkpoint import load_checkpoint
    from generator.models import hyperlora_home
    from training import average

    base, emb = work / "res" / "multitask-holdout", str(work / "emb.safetensors")
    if not base.is_dir():
        _invoke(["train", "multitask-lora", "--tiny", "--out", str(base), "--holdout", "1"])
    runs = []
    for seed, init in ((1, "0"), (2, "0"), (3, None)):
        out = work / "soup" / f"t2l-s{seed}"
        _invoke(["train", "hypernet", "--tiny", "--mode", "sft", "--out", str(out), "--steps", "2", "--val-tasks", "1",
                 "--eval-every", "1", "--base-adapter", str(base), "--embeddings", emb, "--seed", str(seed),
                 *(["--init-seed", init] if init else [])])
        runs.append(out)
    nets = [load_checkpoint(r) for r in runs]
    assert nets[0].cfg.extra["seed"] == 1 and nets[0].cfg.extra["init_seed"] == 0 and "init_seed" not in \
        nets[2].cfg.extra
    assert any(not torch.equal(v, nets[1].state_dict()[k]) for k, v in nets[0].state_dict().items())
    args = average.parser().parse_args(["--members", *map(str, runs[:2]), "--base-model",
                                        str(hyperlora_home() / "tiny-llama"), "--embeddings", emb, "--strengths",
                                        "0.75,1.0", "--out", str(work / "soup" / "avg"),
                                        "--save-soup", str(work / "soup" / "t2l-soup")])
    result = average.run(args)
    rows = result["candidates"]
    assert set(rows) == {"base adapter alone", "t2l-s1", "t2l-s2", "soup", "mean of adapters"}
    n = result["items_per_set"]["fresh"]
    for row in rows.values():
        assert set(row["sft"]) == set(row["fresh"]) == {"0.75", "1.0"} and row["strength"] in row["sft"]
        assert len(row["fresh_items"][row["strength"]]) == n and 0 <= row["fresh_items_above_base"] <= n
    soup = load_checkpoint(work / "soup" / "t2l-soup")
    for k, v in soup.state_dict().items():  # the members' weight average (fp16 on disk)
        assert torch.allclose(v, (nets[0].state_dict()[k] + nets[1].state_dict()[k]) / 2, atol=1e-3), k
    assert soup.cfg.extra["soup_of"] == 2 and soup.cfg.extra["strength"] == float(rows["soup"]["strength"])
    assert json.loads((work / "soup" / "avg" / "average.json").read_text())["members"] == [str(r) for r in runs[:2]]
    mixed = average.parser().parse_args(["--members", str(runs[0]), str(runs[2]), "--base-model",
                                         str(hyperlora_home() / "tiny-llama"), "--embeddings", emb,
                                         "--strengths", "1.0"])
    assert "soup" not in average.run(mixed)["candidates"]  # different initialisations: the mean of adapters only
