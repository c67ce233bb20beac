"""The command line: ``prunekit demo | run | recipes | inspect | compress | bench | structured | llm | export
| analyze | store``. Each command is a plain function in its own module; this file puts them together.

User mistakes print one line, ``error: ...``, and exit with code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import sys

import typer

from prunekit.cli import bench, help_style, inspect, run, structured
from prunekit.cli.analyze import analyze_app
from prunekit.cli.export import export_app
from prunekit.cli.llm import llm_app
from prunekit.cli.store import store_app
from prunekit.errors import PrunekitError

help_style.install()
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" in them is text, not rich markup
    help="Prune neural networks and prove the gains with measurements.",
)
recipes_app = typer.Typer(no_args_is_help=True, help="Built-in recipes.")
recipes_app.command("list")(run.recipes_list)
recipes_app.command("show")(run.recipes_show)


def _version(value: bool) -> None:
    if value:
        from prunekit import __version__

        typer.echo(f"prunekit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """prunekit: smaller, faster networks with measured accuracy, size and latency."""


app.command()(run.demo)
app.command()(run.run)
app.add_typer(recipes_app, name="recipes")
app.command()(inspect.inspect)
app.command()(inspect.compress)
app.command()(bench.bench)
app.command()(structured.structured)
app.add_typer(llm_app, name="llm")
app.add_typer(export_app, name="export")
app.add_typer(analyze_app, name="analyze")
app.add_typer(store_app, name="store")


def main() -> None:
    try:
        app()  # standalone: click handles --help and usage errors (exit 2) and exits itself
    except PrunekitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
