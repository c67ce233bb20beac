"""`prunekit analyze classes` and `prunekit analyze agreement`: the regression checks of a compressed model
(per-class recall against the dense baseline; prediction agreement, clean and perturbed).

Exit codes: 0 when the check passes (or fails without ``--strict``), 3 with ``--strict`` when a class lost
more than the threshold (``prunekit run`` and ``prunekit demo`` use the same code), 2 for a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from prunekit.analysis.perclass import (
    DEFAULT_THRESHOLD_POINTS,
    STRICT_EXIT_CODE,
    check_metrics,
    evaluated_labels,
    warning_lines,
)
from prunekit.errors import PrunekitError

STRICT_HELP = f"Exit with code {STRICT_EXIT_CODE} when a class loses more than the threshold."


def per_class_outcome(metrics: dict[str, Any], strict: bool) -> None:
    """Print the per-class warnings of a run's ``metrics["per_class_check"]``; exit 3 with ``strict``."""
    check = metrics.get("per_class_check")
    if not check:
        return
    for line in warning_lines(check):
        typer.echo(line, err=True)
    if strict and check["failed"]:
        raise typer.Exit(STRICT_EXIT_CODE)


def classes(
    metrics_json: Path = typer.Argument(
        ..., metavar="METRICS_JSON", help="A run's metrics.json (or its dir)."
    ),
    threshold: float = typer.Option(
        DEFAULT_THRESHOLD_POINTS,
        "--class-drop",
        "--threshold",
        help="Recall points a class may lose (the name `run` and `demo` use; --threshold still works).",
    ),
    reference: str = typer.Option(None, "--reference", help="Label to compare against (default: the first)."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the check as JSON."),
) -> None:
    """Per-class recall of every evaluated model against the dense baseline; warns on any class that lost
    more than the threshold, even where overall accuracy holds."""
    from prunekit.jobs.audit import read_metrics

    m = read_metrics(metrics_json)
    check = check_metrics(m, threshold, reference)
    if as_json:
        typer.echo(json.dumps(check, indent=2))
    else:
        ref = check["reference"]
        labels = [label for label in evaluated_labels(m) if label != ref]
        w = max([len(label) for label in labels] + [8])
        typer.echo(f"{'class':>5} {'support':>7} {ref:>{w}} " + " ".join(f"{label:>{w}}" for label in labels))
        support = m[ref].get("support") or [None] * len(m[ref]["per_class_recall"])
        for c, r in enumerate(m[ref]["per_class_recall"]):
            cells = []
            for label in labels:
                p = m[label]["per_class_recall"][c]
                flag = "!" if any(d["class"] == c for d in check["labels"][label]) else " "
                cells.append(f"{'-' if p is None else f'{100 * p:.2f}%':>{w - 1}}{flag}")
            ref_cell = "-" if r is None else f"{100 * r:.2f}%"
            typer.echo(
                f"{c:>5} {'-' if support[c] is None else support[c]:>7} {ref_cell:>{w}} " + " ".join(cells)
            )
        if not labels:  # not an "ok": nothing was checked
            typer.echo(f"nothing to check: {ref} is the only evaluated model in {metrics_json}")
        elif not check["failed"]:
            typer.echo(f"ok: no class lost more than {threshold:g} points of recall against {ref}")
    for line in warning_lines(check):
        typer.echo(line, err=True)
    if strict and check["failed"]:
        raise typer.Exit(STRICT_EXIT_CODE)


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PrunekitError(
            f"{option} takes comma-separated numbers such as 0.05,0.1, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise PrunekitError(f"{option} takes numbers > 0 (fractions of the input std), got {text!r}")
    return values


def agreement(
    dense: Path = typer.Argument(..., help="The reference artifact (.safetensors), e.g. dense."),
    pruned: Path = typer.Argument(..., help="The compressed model's artifact (.safetensors)."),
    data: str = typer.Option("digits", "--data", help="digits, an .npz file, or npz with --data-path."),
    data_path: Path = typer.Option(None, "--data-path", help="File for data sets read from disk."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="As the recipe's data.val_fraction."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="As the recipe's data.test_fraction."),
    sigmas: str = typer.Option(
        "0.05,0.1,0.25", "--sigmas", help="Noise std as fractions of the inputs' std."
    ),
    shifts: bool = typer.Option(True, "--shifts/--no-shifts", help="Also test one-pixel shifts."),
    seed: int = typer.Option(0, "--seed", help="Split and noise seed (a recipe's seed gives its test set)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fraction of test inputs on which PRUNED predicts what DENSE predicts: overall, per true class, and
    under Gaussian noise and one-pixel shifts (the test split of --data with --seed)."""
    from prunekit.jobs.audit import agreement_of_artifacts

    result = agreement_of_artifacts(
        dense,
        pruned,
        data=data,
        data_path=data_path,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        sigmas=_floats(sigmas, "--sigmas"),
        shifts=shifts,
        seed=seed,
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{'input':<20} {'agrees':>8} {'same/total':>11} {'ref keeps':>10} {'cand keeps':>10}")
    clean = result["clean"]
    typer.echo(f"{'clean':<20} {clean['agreement']:>8.2%} {clean['same']:>5}/{clean['samples']:<5}")
    for name, e in result["perturbed"].items():
        typer.echo(
            f"{name:<20} {e['agreement']:>8.2%} {e['same']:>5}/{e['samples']:<5} "
            f"{e['reference_stable']:>10.2%} {e['candidate_stable']:>10.2%}"
        )
    worst = min(
        (c for c, v in enumerate(clean["per_class"]) if v is not None), key=lambda c: clean["per_class"][c]
    )
    typer.echo(f"lowest per-class agreement (clean): class {worst}, {clean['per_class'][worst]:.2%}")
