"""``prunekit bench``: latency, throughput, memory and size of every way to deploy a pruned model."""

from __future__ import annotations

from pathlib import Path

import typer

from prunekit.cli.export import parse_ints


def bench(
    source: str = typer.Argument(
        ...,
        metavar="ARTIFACT_OR_RECIPE",
        help="A .safetensors artifact, a recipe output directory, a recipe YAML or a built-in recipe name.",
    ),
    out: Path = typer.Option(Path("prunekit-bench"), "--out", help="Where bench.json and bench.png go."),
    batch: str = typer.Option("1,8", "--batch", help="Batch sizes, comma-separated."),
    threads: str = typer.Option("1,2", "--threads", help="Thread counts, comma-separated."),
    runs: int = typer.Option(500, "--runs", help="Timed runs per variant and setting (after warm-up)."),
    variants: str = typer.Option(
        "dense,pruned,pruned-int8,compiled,compiled-int8,torch-x86-int8,onnxruntime-fp32,onnxruntime-int8",
        "--variants",
        help="Which variants to measure (the last three: dense engines a user would deploy instead).",
    ),
    input_shape: str = typer.Option(
        "", "--input-shape", help="Example input shape, e.g. 1,3,224,224 (the batch dim is replaced)."
    ),
    memory: bool = typer.Option(
        True, "--memory/--no-memory", help="Measure peak RSS (one probe process per variant)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Latency p50/p99/mean, throughput, peak RSS and size of dense, pruned, pruned+INT8 and compiled."""
    from prunekit.files import atomic_write_json
    from prunekit.jobs import bench as bench_mod

    shape = parse_ints(input_shape) if input_shape else None
    src = bench_mod.resolve_source(source, out, shape)
    chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
    result = bench_mod.bench(
        src,
        parse_ints(batch, "--batch", "1,8"),
        parse_ints(threads, "--threads", "1,2"),
        runs,
        variants=chosen,
        memory=memory,
        progress=not quiet,
    )
    atomic_write_json(out / "bench.json", result)
    bench_mod.chart(result, out / "bench.png")
    typer.echo(bench_mod.table(result))
    for d in result["compile"]:
        sparse = [layer for layer in d["layers"] if layer.get("chosen", "dense") != "dense"]
        typer.echo(
            f"{d['variant']} ({d['threads']} thr, batch {d['batch']}): {len(sparse)}/{len(d['layers'])} "
            f"layers on sparse kernels, compiled in {d['seconds']:.1f} s"
        )
    typer.echo(f"wrote {out / 'bench.json'}, {out / 'bench.png'}")
