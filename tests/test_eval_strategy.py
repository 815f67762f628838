"""`hyperlora eval strategy` end to end on tiny data: a tiny random Llama with SmolLM2's tokenizer, a tiny
hypernetwork, PEFT folders named by task for --library and --dev-library, and a 5-task SNI directory."""

from __future__ import annotations

import json

import pytest
from conftest import random_adapter
from serve_fixtures import build_tiny_hypernet, build_tiny_model
from typer.testing import CliRunner

TRAIN = {"task001_sentiment": "Label the sentiment of the review as positive or negative.",
         "task002_french": "Translate the English sentence into French.",
         "task003_sum": "Add the two numbers and give the sum."}
DEV = {"task900_capital": "Name the capital city of the given country.",
       "task901_plural": "Write the plural form of the given noun."}


def _task(name: str, definition: str, n_descriptions: int) -> dict:
    return {"name": name, "definition": definition, "source": ["s"], "categories": [],
            "descriptions": [f"{definition} (wording {i})" for i in range(n_descriptions)],
            "instances": [{"input": f"example {i} for {name}", "output": [f"answer {i}"]} for i in range(10)]}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from generator.config import load_spec
    from generator.peft_io import save_peft

    tmp = tmp_path_factory.mktemp("eval-strategy")
    model_dir = build_tiny_model(tmp / "model")
    spec = load_spec(str(model_dir))
    ckpt = build_tiny_hypernet(spec, tmp / "hypernet")
    sni = tmp / "sni"
    (sni / "tasks").mkdir(parents=True)
    for name, d in TRAIN.items():
        (sni / "tasks" / f"{name}.json").write_text(json.dumps(_task(name, d, 200)))
    for name, d in DEV.items():
        (sni / "tasks" / f"{name}.json").write_text(json.dumps(_task(name, d, 1)))
    (sni / "manifest.json").write_text(json.dumps({"train": list(TRAIN), "dev": list(DEV)}))
    for folder, names in (("library", TRAIN), ("dev-library", DEV)):
        for seed, (name, definition) in enumerate(names.items()):
            adapter = random_adapter(spec, seed=seed, scale=0.3)
            adapter.metadata["instruction"] = definition  # its hyperlora.json, as `train lora-library` writes it
            save_peft(adapter, tmp / folder / name)
    return tmp, model_dir, ckpt, sni


@pytest.mark.slow
def test_eval_strategy_runs_end_to_end(tiny_world, encoder, monkeypatch):
    from hyperlora import app

    tmp, model_dir, ckpt, sni = tiny_world
    monkeypatch.setattr("generator.encoder.TaskEncoder.load", classmethod(lambda cls, *a, **k: encoder))
    out = tmp / "results"
    result = CliRunner().invoke(app, ["eval", "strategy", "--library", str(tmp / "library"), "--dev-library",
                                      str(tmp / "dev-library"), "--sni", str(sni), "--checkpoint", str(ckpt),
                                      "--base-model", str(model_dir), "--tasks", "2", "--inputs", "2",
                                      "--max-new-tokens", "3", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "strategy.json").read_text())
    assert doc["library"] == {"adapters": 3, "origin": "trained", "dev_adapters": 2}
    assert set(doc["settings"]) == {"a", "b", "c"}
    for setting in doc["settings"].values():
        assert setting["rows"] == 4 and len(setting["tasks"]) == 2
        for s in ("generate", "retrieve", "auto"):
            paths = setting[s]["paths"]
            assert 0 <= setting[s]["rougeL"] <= 100 and paths["retrieve"] + paths["mix"] + paths["generate"] == 4
        assert setting["generate"]["paths"]["generate"] == 4 and setting["retrieve"]["paths"]["retrieve"] == 4
        assert 0 <= setting["retrieve"]["rougeL_description_in_front"] <= 100
        assert setting["generate"]["served_differs"] == 0 and setting["retrieve"]["instruction_from"]["library"] == 4
    # (a): a retrieved adapter's prompt holds its own instruction (a definition), not the held-out paraphrase
    assert doc["settings"]["a"]["retrieve"]["served_differs"] == 4
    # (c): each dev task's own adapter is keyed by its definition, which is the query: a confident match
    assert doc["settings"]["c"]["auto"]["paths"]["retrieve"] == 4
    assert doc["settings"]["c"]["library_top1_is_own_task"] == 1.0
    assert doc["settings"]["b"]["library_top1_is_own_task"] is None
    md = (out / "strategy.md").read_text()
    assert "| (a) train tasks, held-out paraphrases | 2 |" in md and "auto's paths" in md
    assert "Description in front for every strategy:" in md and md.count("| (a) train tasks") == 2


@pytest.mark.slow
def test_served_prompt_fronts_the_instruction_the_adapter_carries(tiny_world, encoder, monkeypatch):
    """retrieve: the library adapter's own instruction in front of the input; generate: the description."""
    from generator.config import GeneratorConfig, build_generator
    from generator.prompt import user_turn
    from retriever.eval_strategy import EvalStrategyConfig, Row, Runner, build_library
    from retriever.strategy import DescriptionStrategy
    from retriever.tasks import load_sni

    tmp, model_dir, ckpt, sni = tiny_world
    monkeypatch.setattr("generator.encoder.TaskEncoder.load", classmethod(lambda cls, *a, **k: encoder))
    ecfg = EvalStrategyConfig(str(sni), str(tmp / "library"), base_model=str(model_dir))
    gen = build_generator(GeneratorConfig(str(model_dir), checkpoint=str(ckpt)))
    library, origin = build_library(tmp / "prompt-library", gen, load_sni(str(sni), "train"), ecfg)
    assert origin == "trained"
    runner = Runner(gen, DescriptionStrategy(library, gen.encoder), ecfg)
    row = Row("task002_french", "Turn this English sentence into French, please.", "The cat sleeps.", ["x"])
    plans, paths, _ = runner.plan([row], ["retrieve", "generate"])
    assert paths["retrieve"]["retrieve"] == 1 and paths["generate"]["generate"] == 1
    got = plans["retrieve"][0]
    own = TRAIN[library.get(got.key.removeprefix("lib:")).name]
    assert (got.source, got.instruction) == ("library", own)
    assert user_turn(own, row.input) in got.prompts["served"]
    assert user_turn(row.description, row.input) in got.prompts["description"]
    made = plans["generate"][0]
    assert (made.source, made.instruction) == ("adapter", row.description)
    assert made.prompts["served"] == made.prompts["description"] and user_turn(row.description, row.input) in \
        made.prompts["served"]


def test_eval_config_names_the_bad_value(tmp_path):
    from retriever.eval_strategy import EvalStrategyConfig

    with pytest.raises(ValueError, match="inputs=0"):
        EvalStrategyConfig(inputs=0)
    with pytest.raises(ValueError, match="library="):
        EvalStrategyConfig(library=str(tmp_path / "missing"))


@pytest.mark.slow
def test_cli_generate_strategy_auto_writes_the_library_adapter(tiny_world, encoder, monkeypatch):
    from generator.config import load_spec
    from generator.peft_io import load_peft
    from hyperlora import app
    from retriever.library import AdapterLibrary

    tmp, model_dir, ckpt, _ = tiny_world
    monkeypatch.setattr("generator.encoder.TaskEncoder.load", classmethod(lambda cls, *a, **k: encoder))
    spec = load_spec(str(model_dir))
    lib = AdapterLibrary(tmp / "cli-library", spec)
    rec = lib.add_peft_dir(tmp / "library" / "task002_french", "task002_french", [TRAIN["task002_french"]], "trained")
    common = ["--library", str(lib.root), "--checkpoint", str(ckpt), "--base-model", str(model_dir)]
    result = CliRunner().invoke(app, ["generate", TRAIN["task002_french"], "--strategy", "auto",
                                      "--out", str(tmp / "cli-out"), *common])
    assert result.exit_code == 0, result.output
    assert f"auto: the library adapter {rec.id}" in result.output and "task002_french" in result.output
    written, stored = load_peft(tmp / "cli-out", spec), lib.load(rec.id)
    for m in stored.a:
        assert written.a[m].equal(stored.a[m]) and written.b[m].equal(stored.b[m])
    result = CliRunner().invoke(app, ["generate", "Name the colour of the sky.", "--strategy", "generate",
                                      "--out", str(tmp / "cli-gen"), *common])
    assert result.exit_code == 0 and "generated a rank-4 LoRA" in result.output, result.output
    result = CliRunner().invoke(app, ["generate", "x", "--strategy", "magic", *common])
    assert result.exit_code != 0 and "not a strategy" in result.output


@pytest.mark.slow
def test_calibration_paraphrases_read_train_tasks_only_and_give_outcome_qualities(tiny_world, encoder, monkeypatch):
    """`--paraphrases calibration`: the library's tasks and a task it lacks, described by descriptions 100-149, no dev
    task; the served ROUGE-L of each outcome (own adapter retrieved, another's, generated) for `train strategy`."""
    import shutil

    from hyperlora import app

    tmp, model_dir, ckpt, sni = tiny_world
    monkeypatch.setattr("generator.encoder.TaskEncoder.load", classmethod(lambda cls, *a, **k: encoder))
    lib = tmp / "two-task-library"
    for name in list(TRAIN)[:2]:
        shutil.copytree(tmp / "library" / name, lib / name, dirs_exist_ok=True)
    out = tmp / "calibration-results"
    result = CliRunner().invoke(app, ["eval", "strategy", "--library", str(lib), "--dev-library",
                                      str(tmp / "dev-library"), "--sni", str(sni), "--checkpoint", str(ckpt),
                                      "--base-model", str(model_dir), "--tasks", "2", "--inputs", "2",
                                      "--max-new-tokens", "3", "--paraphrases", "calibration", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "strategy-calibration.json").read_text())
    assert not (out / "strategy.json").exists()
    assert set(doc["settings"]) == {"a", "lacking"} and doc["settings"]["lacking"]["tasks"] == ["task003_sum"]
    assert not set(DEV) & {t for s in doc["settings"].values() for t in s["tasks"]}
    lacking = doc["settings"]["lacking"]["outcomes"]
    assert lacking["retrieve_own"]["rows"] == 0 and lacking["retrieve_other"]["rows"] == 2  # all retrievals wrong
    assert doc["settings"]["a"]["outcomes"]["generate"]["rows"] == 4
    q = doc["outcome_quality"]
    assert set(q) == {"retrieve_own", "generate", "retrieve_other"} and all(0 <= v <= 100 for v in q.values())
    assert "Served ROUGE-L by outcome" in (out / "strategy-calibration.md").read_text()
    # --calibration decides with another fit: one that never matches leaves auto generating for every row
    from retriever.strategy import CALIBRATION_FILE

    never = json.loads(CALIBRATION_FILE.read_text()) | {"match_threshold": 1.0, "near_threshold": 1.0,
                                                        "instruction_threshold": 1.0, "instruction_margin": 0.5,
                                                        "projection": None}  # (the shipped one is not beside it)
    (tmp / "never.json").write_text(json.dumps(never))
    result = CliRunner().invoke(app, ["eval", "strategy", "--library", str(lib), "--sni", str(sni), "--checkpoint",
                                      str(ckpt), "--base-model", str(model_dir), "--tasks", "2", "--inputs", "2",
                                      "--max-new-tokens", "3", "--paraphrases", "calibration", "--calibration",
                                      str(tmp / "never.json"), "--out-dir", str(out / "never")])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "never" / "strategy-calibration.json").read_text())
    assert doc["thresholds"]["match_threshold"] == 1.0
    assert all(s["auto"]["paths"]["generate"] == s["rows"] for s in doc["settings"].values())
