"""Per-class check: which classes lost more recall than a threshold between a reference and a compressed
model, even where overall accuracy holds (a minority class can collapse inside an unchanged average).

Recalls are fractions in [0, 1] (as ``metrics.json`` stores them); the threshold and the losses are in
percentage points. A class counts as offending when it loses *more* than the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prunekit.errors import PrunekitError

DEFAULT_THRESHOLD_POINTS = 2.0
STRICT_EXIT_CODE = 3  # `--strict` exit status when a class lost too much (2 is a usage error, 1 a crash)


def _check_threshold(threshold_points: float) -> None:
    if not threshold_points >= 0:
        raise PrunekitError(f"the per-class threshold must be >= 0 points, got {threshold_points}")


def class_drops(
    reference: Sequence[float | None],
    candidate: Sequence[float | None],
    threshold_points: float = DEFAULT_THRESHOLD_POINTS,
    support: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """The classes whose recall fell by more than ``threshold_points`` from ``reference`` to ``candidate``,
    worst first, as ``{"class", "reference", "candidate", "points_lost"[, "support"]}``.

    A class with no test inputs (recall None on either side) cannot be judged and is skipped. Losses are
    rounded to 1e-9 points before comparing, so 0.90 -> 0.88 is exactly 2 points, not 2.0000000000000018.
    """
    _check_threshold(threshold_points)
    if len(reference) != len(candidate):
        raise PrunekitError(
            f"per-class recall lists differ in length: {len(reference)} classes vs {len(candidate)}"
        )
    out = []
    for c, (r, p) in enumerate(zip(reference, candidate)):
        if r is None or p is None:
            continue
        lost = round(100 * (r - p), 9)
        if lost > threshold_points:
            entry = {"class": c, "reference": r, "candidate": p, "points_lost": lost}
            if support is not None:
                entry["support"] = support[c]
            out.append(entry)
    return sorted(out, key=lambda e: (-e["points_lost"], e["class"]))


def evaluated_labels(metrics: dict[str, Any]) -> list[str]:
    """The labels of ``metrics.json`` that hold an evaluated model, in evaluation order."""
    return [k for k, v in metrics.items() if isinstance(v, dict) and "per_class_recall" in v]


def check_metrics(
    metrics: dict[str, Any], threshold_points: float = DEFAULT_THRESHOLD_POINTS, reference: str | None = None
) -> dict[str, Any]:
    """Every evaluated label after ``reference`` (default: the first, the dense baseline) checked against
    it: ``{"reference", "threshold_points", "labels": {label: [offending classes]}, "failed"}``."""
    _check_threshold(threshold_points)  # also when there is nothing to compare
    labels = evaluated_labels(metrics)
    if not labels:
        raise PrunekitError("the metrics hold no evaluated model (no entry with per_class_recall)")
    reference = reference or labels[0]
    if reference not in labels:
        raise PrunekitError(f"reference {reference!r} is not an evaluated label; choose one of {labels}")
    ref = metrics[reference]
    checked = {
        label: class_drops(
            ref["per_class_recall"],
            metrics[label]["per_class_recall"],
            threshold_points,
            support=ref.get("support"),
        )
        for label in labels
        if label != reference
    }
    return {
        "reference": reference,
        "threshold_points": threshold_points,
        "labels": checked,
        "failed": any(checked.values()),
    }


def warning_lines(check: dict[str, Any]) -> list[str]:
    """One line per label that lost too much, naming the classes and the points each lost."""
    lines = []
    for label, drops in check["labels"].items():
        if drops:
            named = ", ".join(f"class {d['class']} -{d['points_lost']:.2f}" for d in drops)
            lines.append(
                f"warning: per-class recall of {label} vs {check['reference']} fell by more than "
                f"{check['threshold_points']:g} points: {named}"
            )
    return lines
