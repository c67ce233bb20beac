"""`prunekit analyze sweep`: accuracy, size and measured latency against sparsity for several methods, as
one PNG with the trade-off curves and Pareto fronts plus the table as CSV and JSON (prunekit.jobs.sweep).
"""

from __future__ import annotations

from pathlib import Path

import typer

from prunekit.errors import PrunekitError


def _grid(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PrunekitError(f"--grid: comma-separated sparsities such as 0.5,0.8,0.9, got {text!r}") from None


def sweep(
    artifact: Path = typer.Argument(
        ...,
        help="A prunekit artifact (.safetensors) of a classifier; with --llm a local HF directory or .gguf.",
    ),
    out: Path = typer.Option(..., "--out", help="Directory for sweep.png, sweep.csv and sweep.json."),
    methods: str | None = typer.Option(
        None,
        help="Comma-separated: criteria (magnitude, random, wanda, taylor, "
        "obd), N:M patterns (2:4), channels (structured) [default: magnitude,random,wanda,2:4]. "
        "With --llm: magnitude, wanda, sparsegpt, N:M (magnitude) or METHOD:N:M "
        "[default: magnitude,wanda,sparsegpt,2:4].",
    ),
    grid: str | None = typer.Option(
        None, help="Comma-separated sparsities in (0, 1) [default: 0.5,0.7,0.8,0.9,0.95; --llm 0.3,0.5,0.7]."
    ),
    llm: bool = typer.Option(False, "--llm", help="ARTIFACT is a causal language model: sweep perplexity."),
    calib_file: Path | None = typer.Option(None, help="--llm: calibration text (default: pydoc topics)."),
    eval_file: Path | None = typer.Option(None, help="--llm: evaluation text (default: held-out pydoc)."),
    seqlen: int = typer.Option(256, help="--llm: tokens per calibration / evaluation / timed window."),
    calib_samples: int = typer.Option(32, help="--llm: calibration windows (wanda, sparsegpt)."),
    data: str | None = typer.Option(
        None, help="digits, an .npz file, or npz with --data-path [default: digits]; not with --llm."
    ),
    data_path: Path | None = typer.Option(None, "--data-path", help="For --data npz: file with arrays x, y."),
    finetune_epochs: int = typer.Option(0, help="Fine-tune each pruned copy this many epochs (masks kept)."),
    lr: float = typer.Option(0.01, help="Fine-tuning learning rate."),
    latency_runs: int | None = typer.Option(
        None,
        "--runs",
        "--latency-runs",
        help="Timed batch-1 calls per model, interleaved with dense [default: 100; --llm 20] "
        "(--latency-runs still works).",
    ),
    compile: bool = typer.Option(False, "--compile", help="Also time prunekit.runtime.compile'd models."),  # noqa: A002
    round_to: int = typer.Option(8, help="channels: kept counts rounded to this multiple."),
    threads: int = typer.Option(1, help="torch threads for fine-tuning and timing."),
    seed: int = typer.Option(0, help="Data split and random-criterion seed."),
) -> None:
    """Prune copies of a model with each method at each sparsity and measure accuracy, size and latency."""
    from prunekit.jobs.sweep import sweep_artifact

    if llm:
        _check_llm_flags(data, data_path, finetune_epochs, compile)
        return _llm_sweep(artifact, out, methods, grid, calib_file, eval_file, seqlen, calib_samples,
                          latency_runs, threads, seed)  # fmt: skip
    given = {"--calib-file": calib_file, "--eval-file": eval_file}
    for flag, value in given.items():
        if value is not None:
            raise PrunekitError(f"{flag} is for language models: add --llm")
    result, paths = sweep_artifact(
        artifact,
        out,
        methods or "magnitude,random,wanda,2:4",
        _grid(grid or "0.5,0.7,0.8,0.9,0.95"),
        data=data or "digits",
        data_path=data_path,
        finetune_epochs=finetune_epochs,
        lr=lr,
        latency_runs=100 if latency_runs is None else latency_runs,
        compile=compile,
        round_to=round_to,
        threads=threads,
        seed=seed,
        on_point=lambda p: typer.echo(
            f"{p.method:>10} @ {p.sparsity:.3f}: accuracy {p.accuracy:.4f}, {p.size_bytes:,} B "
            f"(dense {p.dense_size_bytes:,} B), p50 {p.latency_p50_ms:.3f} ms "
            f"({p.latency_ratio:.2f}x dense)"
            + (f", compiled {p.compiled_p50_ms:.3f} ms" if p.compiled_p50_ms is not None else "")
        ),
    )
    typer.echo(f"Pareto front (accuracy vs latency): {', '.join(result['pareto']['latency'])}")
    typer.echo(f"Pareto front (accuracy vs size): {', '.join(result['pareto']['size'])}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def _check_llm_flags(data, data_path, finetune_epochs, compile_too) -> None:  # noqa: ANN001
    if data is not None or data_path is not None:
        raise PrunekitError("--data/--data-path are for classifiers; --llm evaluates on --eval-file text")
    if finetune_epochs:
        raise PrunekitError("--finetune-epochs is for classifiers; the --llm sweep is one-shot")
    if compile_too:
        raise PrunekitError("--compile is for classifiers; the --llm sweep times the model as loaded")


def _llm_sweep(model, out, methods, grid, calib_file, eval_file, seqlen, calib_samples, runs, threads, seed):  # noqa: ANN001
    from prunekit.jobs.llm import TextSettings
    from prunekit.jobs.sweep_llm import DEFAULT_METHODS, sweep_language_model

    text = TextSettings(
        calib_samples, seqlen, calib_file and str(calib_file), eval_file and str(eval_file), seed
    )
    result, paths = sweep_language_model(
        str(model),
        out,
        methods or DEFAULT_METHODS,
        _grid(grid) if grid else None,
        text,
        latency_runs=20 if runs is None else runs,
        threads=threads,
        on_point=lambda p, _model: typer.echo(
            f"{p['method']:>13} @ {p['sparsity']:.3f}: perplexity {p['perplexity']:.3f}, "
            f"{p['size_bytes']:,} B (dense {p['dense_size_bytes']:,} B), "
            f"p50 {p['latency_p50_ms']:.2f} ms ({p['latency_ratio']:.2f}x dense)"
        ),
    )
    typer.echo(f"Pareto front (perplexity vs latency): {', '.join(result['pareto']['latency'])}")
    typer.echo(f"Pareto front (perplexity vs size): {', '.join(result['pareto']['size'])}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
