"""The `hyperlora` command: one entry point, subcommands from each package."""

from __future__ import annotations

import logging
import os

import typer

from generator import commands as gen_cmds

app = typer.Typer(help="hyperlora: LoRA adapters from a sentence, a routed adapter library, and a service.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: print figures and write them to results/.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

app.command("generate")(gen_cmds.generate)
app.command("info")(gen_cmds.info)


def _register_optional() -> None:
    """Subcommands of packages that may be absent in a partial install register themselves here."""
    import importlib

    for mod in ("generator.bench", "retriever.commands", "training.commands", "serve.commands",
                "training.gen_commands", "serve.fuzz"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.register(app, bench_app)


_register_optional()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
