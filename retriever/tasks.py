"""The default library's task list, shipped in the package (`retriever/data/default_tasks.json`).

The product never reads the SNI data directory at run time: `python -m retriever.tasks --sni DIR` builds
this small JSON once from it (train tasks: name, a few descriptions, the first few instances' inputs) and
the file is committed. Evaluation holds out the *last* instances of each task, which this file never holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

DEFAULT_TASKS_FILE = Path(__file__).parent / "data" / "default_tasks.json"
N_DESCRIPTIONS = 32  # descriptions kept per task (the description strategy keys an adapter by as many)
N_SAMPLES = 20  # sample inputs kept per task (LoraRetriever keys an adapter by ~20 of its inputs)
HELD_OUT = 10  # a task's last inputs, which evaluation holds out: never among the samples
MAX_SAMPLE_CHARS = 400  # longer inputs are cut (the embedder reads ~256 tokens anyway)


def load_default_tasks(path: str | Path = DEFAULT_TASKS_FILE) -> list[dict]:
    """[{"name", "descriptions", "sample_inputs"}] of the default library's tasks."""
    data = json.loads(Path(path).read_text())
    return data["tasks"]


def load_sni(sni_dir: str | Path, split: str = "train") -> dict[str, dict]:
    """name -> task JSON of one split of the SNI directory (../shared/data/sni)."""
    root = Path(sni_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    if split not in manifest:
        raise ValueError(f"split {split!r} is not in {root}/manifest.json; it has {sorted(manifest)}")
    return {name: json.loads((root / "tasks" / f"{name}.json").read_text()) for name in manifest[split]}


def export(sni_dir: str | Path, out: str | Path = DEFAULT_TASKS_FILE, n_descriptions: int = N_DESCRIPTIONS,
           n_samples: int = N_SAMPLES) -> Path:
    tasks = load_sni(sni_dir, "train")
    rows = [{"name": name, "descriptions": t["descriptions"][:n_descriptions],
             "sample_inputs": [i["input"][:MAX_SAMPLE_CHARS].strip()
                               for i in t["instances"][: min(n_samples, len(t["instances"]) - HELD_OUT)]]}
            for name, t in sorted(tasks.items())]
    doc = {"source": "Super-NaturalInstructions train tasks (Apache-2.0); descriptions from SakanaAI/text-to-lora",
           "n_descriptions": n_descriptions, "n_samples": n_samples, "sample_instances": "first", "tasks": rows}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return out


def main(sni: Path = typer.Option(..., "--sni", help="The SNI data directory (holds manifest.json, tasks/)."),
         out: Path = typer.Option(DEFAULT_TASKS_FILE, "--out", help="Where to write the JSON.")) -> None:
    """Build retriever/data/default_tasks.json from the SNI train split."""
    path = export(sni, out)
    typer.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    typer.run(main)
