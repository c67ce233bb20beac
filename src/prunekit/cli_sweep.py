"""`prunekit analyze sweep`: accuracy, size and measured latency against sparsity for several methods, as
one PNG with the trade-off curves and Pareto fronts plus the table as CSV and JSON (prunekit.analysis.sweep).
"""

from __future__ import annotations

from pathlib import Path

import typer

from prunekit.cli_analyze import analyze_app
from prunekit.errors import PrunekitError


def _grid(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PrunekitError(f"--grid: comma-separated sparsities such as 0.5,0.8,0.9, got {text!r}") from None


@analyze_app.command("sweep")
def sweep(
    artifact: Path = typer.Argument(..., help="A prunekit artifact (.safetensors) of a classifier."),
    out: Path = typer.Option(..., "--out", help="Directory for sweep.png, sweep.csv and sweep.json."),
    methods: str = typer.Option(
        "magnitude,random,wanda,2:4",
        help="Comma-separated: criteria (magnitude, random, wanda, taylor, "
        "obd), N:M patterns (2:4), channels (structured).",
    ),
    grid: str = typer.Option("0.5,0.7,0.8,0.9,0.95", help="Comma-separated sparsities in (0, 1)."),
    data: str = typer.Option("digits", help="digits or npz."),
    data_path: Path | None = typer.Option(None, "--data-path", help="For --data npz: file with arrays x, y."),
    finetune_epochs: int = typer.Option(0, help="Fine-tune each pruned copy this many epochs (masks kept)."),
    lr: float = typer.Option(0.01, help="Fine-tuning learning rate."),
    latency_runs: int = typer.Option(100, help="Timed batch-1 calls per model (interleaved with dense)."),
    compile: bool = typer.Option(False, "--compile", help="Also time prunekit.runtime.compile'd models."),  # noqa: A002
    round_to: int = typer.Option(8, help="channels: kept counts rounded to this multiple."),
    threads: int = typer.Option(1, help="torch threads for fine-tuning and timing."),
    seed: int = typer.Option(0, help="Data split and random-criterion seed."),
) -> None:
    """Prune copies of a model with each method at each sparsity and measure accuracy, size and latency."""
    import torch

    from prunekit.analysis.sweep import check_grid, parse_methods, run_sweep, write_sweep
    from prunekit.artifact import load_artifact
    from prunekit.data import load_splits

    if data not in ("digits", "npz"):
        raise PrunekitError(f"--data must be digits or npz, got {data!r}")
    if data == "npz" and data_path is None:
        raise PrunekitError("--data npz needs --data-path FILE.npz")
    if latency_runs < 1 or threads < 1:
        raise PrunekitError("--latency-runs and --threads must be >= 1")
    chosen = parse_methods(methods)
    sparsities = check_grid(_grid(grid))
    if not artifact.is_file():
        raise PrunekitError(f"ARTIFACT {artifact}: no such file")
    model, _ = load_artifact(artifact, masked=False)
    splits = load_splits(data, data_path, seed=seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = run_sweep(
            model,
            splits,
            chosen,
            sparsities,
            finetune_epochs=finetune_epochs,
            lr=lr,
            latency_runs=latency_runs,
            compile=compile,
            round_to=round_to,
            seed=seed,
            on_point=lambda p: typer.echo(
                f"{p.method:>10} @ {p.sparsity:.3f}: accuracy {p.accuracy:.4f}, {p.size_bytes:,} B "
                f"(dense {p.dense_size_bytes:,} B), p50 {p.latency_p50_ms:.3f} ms "
                f"({p.latency_ratio:.2f}x dense)"
                + (f", compiled {p.compiled_p50_ms:.3f} ms" if p.compiled_p50_ms is not None else "")
            ),
        )
    finally:
        torch.set_num_threads(before)
    paths = write_sweep(result, out)
    typer.echo(f"Pareto front (accuracy vs latency): {', '.join(result['pareto']['latency'])}")
    typer.echo(f"Pareto front (accuracy vs size): {', '.join(result['pareto']['size'])}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
