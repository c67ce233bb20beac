"""`prunekit analyze sensitivity ARTIFACT`: per-layer sensitivity curves (prunekit.analysis.sensitivity) as a
table, ``sensitivity.json``, ``sensitivity.csv`` and ``sensitivity.png``; with ``--target`` also the
per-layer allocation that meets it (prunekit.allocate.sensitivity), printed and written to
``allocation.json``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from prunekit.cli.export import parse_floats
from prunekit.errors import PrunekitError
from prunekit.spec import check_sparsity

_GRID = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95"


def sensitivity(
    artifact: Path = typer.Argument(..., help="A prunekit artifact (.safetensors) of a classifier."),
    data: str = typer.Option("digits", "--data", help="digits or npz."),
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
    calibration_batches: int = typer.Option(8, help="Training batches for taylor / obd / wanda."),
    seed: int = typer.Option(0, "--seed", help="Data split seed (recipes' seed; default 0)."),
) -> None:
    """Prune each layer alone at each sparsity (no fine-tuning) and measure the validation metric drop."""
    from torch import nn

    from prunekit.allocate.sensitivity import sensitivity_allocation
    from prunekit.analysis import sensitivity as sens
    from prunekit.artifact import load_artifact
    from prunekit.data import load_splits
    from prunekit.data.arrays import check_model_fits
    from prunekit.files import atomic_write_json
    from prunekit.masking import get_masks

    if data not in ("digits", "npz"):
        raise PrunekitError(f"--data must be digits or npz, got {data!r}")
    if data == "npz" and data_path is None:
        raise PrunekitError("--data npz needs --data-path FILE.npz")
    for name, value in (
        ("--batches", batches),
        ("--batch-size", batch_size),
        ("--calibration-batches", calibration_batches),
    ):
        if value is not None and value < 1:
            raise PrunekitError(f"{name} must be >= 1, got {value}")
    sparsities = sens.check_grid(parse_floats(grid))
    if max_sparsity is not None and target is None:
        raise PrunekitError("--max-sparsity caps the allocation: give --target too")
    if target is not None:  # the cheap checks before the analysis; the allocator checks the rest
        check_sparsity(target, "--target")
        cap = sparsities[-1] if max_sparsity is None else max_sparsity
        if not 0 <= target <= cap:
            raise PrunekitError(
                f"--target {target} is out of reach: every layer is capped at {cap} (--max-sparsity, "
                "default the grid's largest)"
            )
    if not artifact.is_file():
        raise PrunekitError(f"ARTIFACT {artifact}: no such file")
    model, _ = load_artifact(artifact, masked=True)  # earlier pruning counts: masks only shrink
    splits = load_splits(data, data_path, val_fraction, test_fraction, seed=seed)
    check_model_fits(model, splits, f"ARTIFACT {artifact}")
    calibration = None
    from prunekit.criteria.base import make_criterion

    if make_criterion(criterion).needs in ("gradients", "activations"):
        calibration = [b for _, b in zip(range(calibration_batches), splits.loader("train", batch_size))]
    sens.make_metric(metric)
    try:  # before the analysis, which takes minutes: an --out that cannot be made fails at once
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    result = sens.sensitivity_analysis(
        model,
        splits.loader("val", batch_size),
        sparsities=sparsities,
        criterion=criterion,
        metric=metric,
        max_batches=batches,
        calibration=calibration,
        loss_fn=nn.CrossEntropyLoss(),
        seed=seed,
    )
    plan = None
    if target is not None:
        masks = get_masks(model)
        already = {n: float((~m).sum()) / m.numel() for n, m in masks.items() if n in result.params()}
        plan = sensitivity_allocation(
            result.curves(), result.params(), target, max_sparsity=max_sparsity, min_sparsity=already
        )
    sens.write_json(result, out / "sensitivity.json")
    sens.write_csv(result, out / "sensitivity.csv")
    sens.write_heatmap(result, out / "sensitivity.png", plan.sparsity if plan else None)
    typer.echo(result.table())
    written = ["sensitivity.json", "sensitivity.csv", "sensitivity.png"]
    if plan is not None:
        atomic_write_json(out / "allocation.json", plan.to_dict())
        written.append("allocation.json")
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
