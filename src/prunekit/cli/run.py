"""``prunekit demo``, ``prunekit run`` and ``prunekit recipes``: run a recipe, print its summary.

``run``/``demo --strict`` exit with code 3 when a class lost more than ``--class-drop`` points of recall.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import typer

from prunekit.cli.audit import STRICT_HELP, per_class_outcome

CLASS_DROP_HELP = "Recall points a class may lose against the first evaluated model before a warning."


def _summary(metrics: dict[str, Any], out: Path) -> None:
    labels = [k for k, v in metrics.items() if isinstance(v, dict) and "accuracy" in v]
    w = max([len(label) for label in labels] + [10])
    typer.echo(f"{'model':<{w}} {'accuracy':>9} {'sparsity':>9} {'size KiB':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for label in labels:
        e = metrics[label]
        size = f"{e['size_bytes'] / 1024:.1f}" if e.get("size_bytes") else "-"
        typer.echo(
            f"{label:<{w}} {e['accuracy']:>9.4f} {e['sparsity']:>9.4f} {size:>9} "
            f"{e['latency_ms']['p50']:>8.3f} {e['latency_ms']['p99']:>8.3f}"
        )
    typer.echo(
        f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'} "
        f"(in {metrics['wall_time_s']:.0f} s)"
    )


def _run(
    recipe,
    out: Path,
    quiet: bool,
    strict: bool = False,
    class_drop: float = 2.0,
    resume: bool = False,
    tensorboard: Path | None = None,
    store: Path | None = None,
    force: bool = False,
) -> None:

    from tqdm.contrib.logging import logging_redirect_tqdm

    from prunekit.jobs.run import run_recipe

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    if store is not None and main_rank:
        from prunekit.store import Store

        Store(store).create()  # a bad --store fails now, not after the run
    logging.basicConfig(
        level=logging.WARNING if quiet or not main_rank else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    with logging_redirect_tqdm():
        metrics = run_recipe(
            recipe,
            out,
            progress=not quiet,
            class_drop=class_drop,
            resume=resume,
            tensorboard=tensorboard,
            force=force,
        )
    if not main_rank:
        return
    _summary(metrics, out)
    per_class_outcome(metrics, strict)  # warning lines; exit 3 with --strict
    if store is not None:  # after the check: a run that fails --strict is not stored
        from prunekit.cli.store import store_run

        store_run(store, out)


STORE_HELP = "Then add the exports to this artifact store (see `prunekit store --help`)."
FORCE_HELP = "--out holds an earlier run: delete that run's files first (your other files stay)."


def demo(
    out: Path = typer.Option(Path("prunekit-demo"), "--out", help="Output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    class_drop: float = typer.Option(2.0, "--class-drop", metavar="POINTS", help=CLASS_DROP_HELP),
    store: Path = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Run the built-in edge-digits recipe: dense CNN -> pruning to 90% -> INT8 -> report (runtime timed)."""
    from prunekit.jobs import recipe

    _run(recipe.load_builtin("edge-digits"), out, quiet, strict, class_drop, store=store, force=force)


def run(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="A recipe YAML file."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    class_drop: float = typer.Option(2.0, "--class-drop", metavar="POINTS", help=CLASS_DROP_HELP),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run whose checkpoint is in --out (same recipe)."
    ),
    tensorboard: Path = typer.Option(
        None, "--tensorboard", metavar="DIR", help="Also log rounds and epochs as TensorBoard scalars."
    ),
    store: Path = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Run a recipe file (see `prunekit recipes show edge-digits` for an example). Under
    `torchrun --nproc-per-node N -m prunekit run ...` the training is distributed (DDP)."""
    from prunekit.jobs import recipe

    chosen = recipe.load(recipe_file)
    _run(chosen, out, quiet, strict, class_drop, resume, tensorboard, store=store, force=force)


def recipes_list() -> None:
    """Name the built-in recipes."""
    from prunekit.jobs import recipe

    names = recipe.builtin_names()
    width = max(map(len, names)) + 2  # one column for the names, the descriptions wrapped beside them
    text_width = max(40, shutil.get_terminal_size().columns - width)
    for name in names:
        description = recipe.load_builtin(name).description
        lines = textwrap.wrap(description, text_width, break_on_hyphens=False) or [""]
        typer.echo(f"{name:<{width}}{lines[0]}")
        for line in lines[1:]:
            typer.echo(" " * width + line)


def recipes_show(name: str = typer.Argument(..., help="A built-in recipe name.")) -> None:
    """Print a built-in recipe's YAML (accepted unchanged by `prunekit run`)."""
    from prunekit.jobs import recipe

    typer.echo(recipe.builtin_text(name), nl=False)
