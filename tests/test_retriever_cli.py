"""`hyperlora library ...`, `hyperlora route`, and the shared `eval` group."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import random_adapter
from typer.testing import CliRunner

from generator.peft_io import save_peft
from retriever import commands
from retriever.library import AdapterLibrary

runner = CliRunner()


@pytest.fixture
def app():
    from hyperlora import app

    return app


def test_library_add_list_show_remove(app, tmp_path, tiny_spec):
    root = tmp_path / "lib"
    AdapterLibrary(root, tiny_spec)
    save_peft(random_adapter(tiny_spec), tmp_path / "up")
    res = runner.invoke(app, ["library", "add", str(tmp_path / "up"), "--library", str(root), "-n", "dates",
                              "-d", "Convert dates to another format.", "-s", "12/01/2020"])
    assert res.exit_code == 0, res.output
    adapter_id = res.output.split()[1]
    res = runner.invoke(app, ["library", "list", "--library", str(root), "--json"])
    assert [r["id"] for r in json.loads(res.output)] == [adapter_id]
    res = runner.invoke(app, ["library", "show", adapter_id, "--library", str(root)])
    assert json.loads(res.output)["sample_inputs"] == ["12/01/2020"] and str(root) not in res.output
    res = runner.invoke(app, ["library", "show", "../../etc/passwd", "--library", str(root)])
    assert res.exit_code == 2 and "not valid" in res.output
    assert runner.invoke(app, ["library", "remove", adapter_id, "--library", str(root)]).exit_code == 0
    res = runner.invoke(app, ["library", "remove", adapter_id, "--library", str(root)])
    assert res.exit_code == 2 and "no adapter with id" in res.output


def test_library_add_refuses_a_pickle_upload(app, tmp_path, tiny_spec):
    root = tmp_path / "lib"
    AdapterLibrary(root, tiny_spec)
    save_peft(random_adapter(tiny_spec), tmp_path / "up")
    (tmp_path / "up" / "adapter_model.bin").write_bytes(b"pickle")
    res = runner.invoke(app, ["library", "add", str(tmp_path / "up"), "--library", str(root), "-n", "x", "-d", "y"])
    assert res.exit_code == 2 and "refusing pickle-based file" in res.output


@pytest.mark.slow
def test_route_prints_ranked_adapters(app, tmp_path, tiny_spec):
    lib = AdapterLibrary(tmp_path / "lib", tiny_spec)
    lib.add(random_adapter(tiny_spec), "sums", ["Add two numbers."], "generated", ["What is 2 + 2?", "Add 3 and 9."])
    lib.add(random_adapter(tiny_spec), "french", ["Translate to French."], "generated", ["Translate: good morning"])
    res = runner.invoke(app, ["route", "What is 40 + 2?", "-k", "2", "--library", str(lib.root), "--json"])
    assert res.exit_code == 0, res.output
    (route,) = json.loads(res.stdout)
    assert route["names"][0] == "sums" and len(route["ids"]) == 2
    res = runner.invoke(app, ["route", "x", "-k", "0", "--library", str(lib.root)])
    assert res.exit_code == 2 and "top_k" in res.output


@pytest.mark.parametrize("existing", [True, False])
def test_eval_group_is_shared_whichever_registers_first(existing):
    app, bench = typer.Typer(), typer.Typer()
    other = typer.Typer()
    if existing:
        app.add_typer(other, name="eval")
        other.command("training")(lambda: None)
    commands.register(app, bench)
    groups = [g for g in app.registered_groups if g.name == "eval"]
    assert len(groups) == 1
    names = [c.name for c in groups[0].typer_instance.registered_commands]
    assert "routing" in names and ("training" in names) == existing
