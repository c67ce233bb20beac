"""`prunekit analyze ...`: sensitivity analysis, sparsity sweeps, prediction agreement and per-class checks.

Each command is a plain function in its own module; this file puts them on ``analyze_app``.
"""

from __future__ import annotations

import typer

from prunekit.cli import audit, sensitivity, sweep

analyze_app = typer.Typer(
    help="Evidence for a pruning decision: sensitivity, sweeps, agreement, per-class recall.",
    no_args_is_help=True,
)
analyze_app.command("classes")(audit.classes)
analyze_app.command("agreement")(audit.agreement)
analyze_app.command("sensitivity")(sensitivity.sensitivity)
analyze_app.command("sweep")(sweep.sweep)
