"""The ``ditstream`` command.

Each module of ``ditstream/commands`` (one per command, ``bench.py`` for every ``bench`` subcommand)
adds its commands through ``register(app, bench)``; the commands parse options and call the code that
does the work. Those modules import only typer at import time so ``ditstream --help`` stays fast, and
heavy imports (torch, diffusers, FastAPI) happen inside the command that needs them.
"""

from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(
    name="ditstream",
    help="Real-time streaming image generation with one-step diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Measure speed and quality (ratios measured side by side in one run).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

#: Packages that contribute commands, in help order. A missing module is skipped only if it is
#: the module itself that is absent (a package not built yet), never on an import error inside it.
COMMAND_MODULES = ("ditstream.commands.generate", "ditstream.commands.demo", "ditstream.commands.serve",
                   "ditstream.commands.worker", "ditstream.commands.bench", "ditstream.commands.client",
                   "ditstream.commands.build")


def version() -> str:
    """The installed distribution's version (pyproject.toml), or the source tree's if not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ditstream")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ditstream {version()}")
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
          _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # absent module or absent parent package: that package is not part of this install
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register(app, bench_app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
