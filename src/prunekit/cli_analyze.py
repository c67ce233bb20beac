"""`prunekit analyze ...`: sensitivity analysis, sparsity sweeps, prediction agreement and per-class checks.

The commands live in small modules that register on ``analyze_app`` (imported at the end of this file, so
``prunekit.cli`` needs only this one import).
"""

from __future__ import annotations

import typer

analyze_app = typer.Typer(
    help="Evidence for a pruning decision: sensitivity, sweeps, agreement, per-class recall.",
    no_args_is_help=True,
)

# registering the commands needs analyze_app defined first
from prunekit import (  # noqa: E402
    cli_audit,  # noqa: F401  (registers its commands)
    cli_sensitivity,  # noqa: F401  (registers `sensitivity`)
    cli_sweep,  # noqa: F401  (registers `sweep`)
)
