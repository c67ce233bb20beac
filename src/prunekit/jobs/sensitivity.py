"""``prunekit analyze sensitivity``: per-layer sensitivity curves of an artifact
(prunekit.analysis.sensitivity) written as ``sensitivity.json``, ``.csv`` and ``.png``; with a target also
the per-layer allocation that meets it (prunekit.allocate.sensitivity), written to ``allocation.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunekit.allocate.sensitivity import LayerAllocation, sensitivity_allocation
from prunekit.analysis import sensitivity as sens
from prunekit.artifact import load_artifact
from prunekit.criteria.base import make_criterion
from prunekit.data import load_splits
from prunekit.data.arrays import check_array_source, check_model_fits
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json
from prunekit.masking import get_masks
from prunekit.spec import check_sparsity


def run_sensitivity(
    artifact: Path,
    out: Path,
    grid: list[float],
    *,
    data: str = "digits",
    data_path: Path | None = None,
    criterion: str = "magnitude",
    metric: str = "accuracy",
    target: float | None = None,
    max_sparsity: float | None = None,
    batches: int | None = None,
    batch_size: int = 64,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    calibration_batches: int = 8,
    seed: int = 0,
) -> tuple[Any, LayerAllocation | None, list[str]]:
    """Prune each layer alone at each sparsity of ``grid`` (no fine-tuning), measure the validation metric
    drop, allocate ``target`` when given; returns ``(result, allocation or None, files written)``."""
    check_array_source(data, data_path)
    for name, value in (
        ("--batches", batches),
        ("--batch-size", batch_size),
        ("--calibration-batches", calibration_batches),
    ):
        if value is not None and value < 1:
            raise PrunekitError(f"{name} must be >= 1, got {value}")
    sparsities = sens.check_grid(grid)
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
    written = ["sensitivity.json", "sensitivity.csv", "sensitivity.png"]
    if plan is not None:
        atomic_write_json(out / "allocation.json", plan.to_dict())
        written.append("allocation.json")
    return result, plan, written
