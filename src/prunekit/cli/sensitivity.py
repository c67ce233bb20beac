"""`prunekit analyze sensitivity ARTIFACT`: per-layer sensitivity curves (prunekit.analysis.sensitivity) as a
table, ``sensitivity.json``, ``sensitivity.csv`` and ``sensitivity.png``; with ``--target`` also the
per-layer allocation that meets it (prunekit.allocate.sensitivity), printed and written to
``allocation.json``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from prunekit.cli.export import parse_floats

_GRID = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95"


def sensitivity(
    artifact: Path = typer.Argument(..., help="A prunekit artifact (.safetensors) of a classifier."),
    data: str = typer.Option("digits", "--data", help="digits, an .npz file, or npz with --data-path."),
    data_path: Path | None = typer.Option(None, "--data-path", help="For --data npz: file with arrays x, y."),
    grid: str = typer.Option(_GRID, "--grid", help="Comma-separated, increasing sparsities in (0, 1)."),
    criterion: str = typer.Option("magnitude", "--criterion", help="magnitude, random, taylor, obd, wanda."),
    metric: str = typer.Option("accuracy", "--metric", help="accuracy or loss (on the validation split)."),
    out: Path = typer.Option(Path("prunekit-sensitivity"), "--out", help="Output directory."),
    target: float | None = typer.Option(None, "--target", help="Also allocate this global sparsity."),
    max_sparsity: float | None = typer.Option(
        None, "--max-sparsity", help="Per-layer cap for --target (default: the grid's largest)."
    ),
    batches: int | None = typer.Option(None, "--batches", help="Validation batches to use (default all)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Validation batch size."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="As in recipes' data.val_fraction."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="As in recipes' data.test_fraction."),
    calibration_batches: int = typer.Option(
        8,
        "--calib-batches",
        "--calibration-batches",
        help="Training batches for taylor / obd / wanda (--calibration-batches still works).",
    ),
    seed: int = typer.Option(0, "--seed", help="Data split seed (recipes' seed; default 0)."),
) -> None:
    """Prune each layer alone at each sparsity (no fine-tuning) and measure the validation metric drop."""
    from prunekit.jobs.sensitivity import run_sensitivity

    result, plan, written = run_sensitivity(
        artifact,
        out,
        parse_floats(grid),
        data=data,
        data_path=data_path,
        criterion=criterion,
        metric=metric,
        target=target,
        max_sparsity=max_sparsity,
        batches=batches,
        batch_size=batch_size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        calibration_batches=calibration_batches,
        seed=seed,
    )
    typer.echo(result.table())
    if plan is not None:
        typer.echo(f"\nallocation for {target:.2%} overall ({plan.target_pruned:,} weights pruned):")
        width = max(len("layer"), *(len(n) for n in plan.sparsity))
        unit = " (points)" if result.metric == "accuracy" else ""
        scale = 100.0 if result.metric == "accuracy" else 1.0
        typer.echo(f"{'layer':<{width}} {'params':>8} {'sparsity':>8} {'pruned':>8}  predicted drop{unit}")
        for n, s in plan.sparsity.items():
            typer.echo(
                f"{n:<{width}} {result.params()[n]:>8} {s:>8.2%} {plan.pruned[n]:>8}  "
                f"{plan.predicted_drop[n] * scale:.2f}"
            )
        total = sum(plan.predicted_drop.values()) * scale
        typer.echo(f"summed predicted drop {total:.2f}{unit} (additivity assumed; measure the pruned model)")
    typer.echo(f"wrote {', '.join(written)} in {out}")
