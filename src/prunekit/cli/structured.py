"""``prunekit structured``: physically remove units and measure the model before and after."""

from __future__ import annotations

from pathlib import Path

import typer

from prunekit.cli.export import parse_ints


def structured(
    model: str = typer.Option(
        ..., "--model", help="Built-in name, .safetensors artifact, or package.module:factory."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    ratio: float = typer.Option(0.5, "--ratio", help="Fraction of channels/heads/neurons to remove."),
    importance: str = typer.Option("l2", "--importance", help="l1, l2, bn_scale, fpgm or random."),
    round_to: int = typer.Option(8, "--round-to", help="Round kept counts to this multiple."),
    input_shape: str = typer.Option("", "--input-shape", help="Example input shape, e.g. 1,3,224,224."),
    runs: int = typer.Option(200, "--runs", help="Timed runs per model for latency."),
    hidden: bool = typer.Option(
        False,
        "--hidden",
        help="Also prune widths a LayerNorm/RMSNorm normalises over (residual streams, hidden size): "
        "approximate, expect to fine-tune.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Physically remove channels/heads/neurons and measure params, MACs and latency before and after."""
    from prunekit.files import refuse_same_file
    from prunekit.jobs.structured import load_model_spec, run_structured
    from prunekit.store import refuse_inside_store
    from prunekit.structured.storage import WEIGHTS

    if model.endswith(".safetensors"):  # OUT/model.safetensors is written: never over the model read
        refuse_same_file(out / WEIGHTS, model, "--out", "--model")
    refuse_inside_store(out)
    shape = parse_ints(input_shape) if input_shape else None
    net, example = load_model_spec(model, shape)
    m = run_structured(
        net,
        example,
        out,
        ratio=ratio,
        importance=importance,
        round_to=round_to,
        runs=runs,
        model_name=model,
        prune_norm_coupled=hidden,
        progress=not quiet,
    )
    typer.echo(f"{'':<8} {'params':>12} {'MACs':>14} {'p50 ms':>9} {'p99 ms':>9}")
    for label in ("dense", "pruned"):
        e = m[label]
        typer.echo(
            f"{label:<8} {e['params']:>12,} {e['macs']:>14,} {e['latency_ms']['p50']:>9.3f} "
            f"{e['latency_ms']['p99']:>9.3f}"
        )
    typer.echo(
        f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'report.html'}, {out / 'prune_log.json'}"
    )
