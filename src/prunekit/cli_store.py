"""`prunekit store ...`: the artifact store (dense original and compressed versions with their lineage)."""

from __future__ import annotations

import typer

store_app = typer.Typer(
    help="Versioned artifacts with lineage: list, show, diff, rollback, verify.", no_args_is_help=True
)
