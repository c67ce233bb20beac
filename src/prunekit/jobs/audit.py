"""The audit jobs: a run's saved metrics read back for ``prunekit analyze classes``, and the prediction
agreement of two artifacts for ``prunekit analyze agreement`` (prunekit.analysis.agreement)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.analysis.agreement import agreement_report
from prunekit.analysis.perclass import evaluated_labels
from prunekit.artifact import load_artifact
from prunekit.data import load_splits
from prunekit.data.arrays import check_model_fits
from prunekit.errors import PrunekitError


def read_metrics(path: Path) -> dict[str, Any]:
    """The metrics.json of a run (or of the run directory ``path``), with at least one evaluated model."""
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrunekitError(f"METRICS_JSON {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunekitError(f"METRICS_JSON {path}: not a readable JSON file: {exc}") from None
    if not isinstance(data, dict) or not evaluated_labels(data):
        raise PrunekitError(
            f"METRICS_JSON {path}: no evaluated model in it (expected the metrics.json of `prunekit run`, "
            "with per_class_recall per label)"
        )
    return data


def agreement_of_artifacts(
    dense: Path,
    pruned: Path,
    *,
    data: str = "digits",
    data_path: Path | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    sigmas: Sequence[float] = (0.05, 0.1, 0.25),
    shifts: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """How often the artifact ``pruned`` predicts what ``dense`` predicts on the test split, clean, per true
    class, under Gaussian noise (``sigmas`` of the inputs' std) and one-pixel ``shifts``."""
    reference, _ = load_artifact(dense, masked=False)
    candidate, _ = load_artifact(pruned, masked=False)
    splits = load_splits(data, data_path, val_fraction, test_fraction, seed=seed)
    check_model_fits(reference, splits, f"DENSE {dense}")
    check_model_fits(candidate, splits, f"PRUNED {pruned}")
    return agreement_report(
        reference, candidate, splits.loader("test", 256), splits.num_classes, tuple(sigmas), shifts, seed
    )
