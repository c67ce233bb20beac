"""``prunekit inspect`` and ``prunekit compress``: the per-layer table of an artifact, and writing one in
its smallest encodings."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def inspect(
    artifact: Path = typer.Argument(..., help="A prunekit .safetensors artifact."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Check the file's SHA-256 first (--no-verify: the output says so)."
    ),
) -> None:
    """Print the per-layer table: shape, params, non-zeros, sparsity, pattern (for a compressed artifact:
    encoding and exact bytes, index overhead apart). The file's SHA-256 is checked first."""
    from prunekit.artifact import inspect_artifact
    from prunekit.compress.container import is_compressed

    if is_compressed(artifact):
        _print_compressed(artifact, as_json, verify=verify)
        return
    rows, totals = inspect_artifact(artifact, verify=verify)
    if as_json:
        typer.echo(json.dumps({"layers": rows, "total": totals}, indent=2))
        return
    width = max([len(r["tensor"]) for r in rows] + [6])
    typer.echo(f"{'tensor':<{width}}  {'shape':<16} {'params':>10} {'nonzero':>10} {'sparsity':>9}  pattern")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        typer.echo(
            f"{r['tensor']:<{width}}  {shape:<16} {r['params']:>10,} {r['nonzero']:>10,} "
            f"{r['sparsity']:>9.2%}  {r['pattern']}"
        )
    typer.echo(
        f"{'total':<{width}}  {'':<16} {totals['params']:>10,} {totals['nonzero']:>10,} "
        f"{totals['sparsity']:>9.2%}  file {totals['size_bytes']:,} bytes"
    )
    typer.echo(_verified(totals["verified"]))


def _verified(verified: bool) -> str:
    return "SHA-256 verified" if verified else "NOT verified (--no-verify): damaged data would go unnoticed"


def _print_compressed(path: Path, as_json: bool, verify: bool = True) -> None:
    from prunekit.compress.inspect import inspect_compressed

    rows, totals = inspect_compressed(path, verify=verify)
    if as_json:
        typer.echo(json.dumps({"layers": rows, "total": totals}, indent=2))
        return
    width = max([len(r["tensor"]) for r in rows] + [6])
    typer.echo(
        f"{'tensor':<{width}}  {'shape':<14} {'encoding':<8} {'dtype':<8} {'sparsity':>8} "
        f"{'values B':>10} {'index B':>9} {'scales B':>8} {'total B':>10} {'dense B':>10}"
    )
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        typer.echo(
            f"{r['tensor']:<{width}}  {shape:<14} {r['encoding']:<8} {r['dtype']:<8} {r['sparsity']:>8.2%} "
            f"{r['value_bytes']:>10,} {r['index_bytes']:>9,} {r['scale_bytes']:>8,} {r['bytes']:>10,} "
            f"{r['dense_bytes']:>10,}"
        )
    t = totals
    typer.echo(
        f"{'total':<{width}}  {'':<14} {'':<8} {str(t['value_dtype']):<8} {'':>8} {t['value_bytes']:>10,} "
        f"{t['index_bytes']:>9,} {t['scale_bytes']:>8,} {t['payload_bytes']:>10,} {t['dense_bytes']:>10,}"
    )
    typer.echo(
        f"file {t['file_bytes']:,} bytes (file header and alignment {t['file_overhead_bytes']:,}); "
        f"{t['ratio_vs_dense']:.2f}x smaller than the tensors stored dense"
    )
    typer.echo(f"format version {t['format_version']}; {_verified(t['verified'])}")


def compress(
    source: Path = typer.Argument(
        ..., help="A prunekit artifact, a `prunekit llm prune` directory, or a plain safetensors state dict."
    ),
    out: Path = typer.Option(..., "--out", help="The compressed .safetensors file to write."),
    dtype: str = typer.Option("keep", "--dtype", help="Values: keep, float32, float16, bfloat16, int8."),
    encodings: str = typer.Option(
        "dense,bitmask,csr,nm,block",
        "--encodings",
        help="Comma-separated encodings the writer may choose from.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the size table as JSON."),
) -> None:
    """Write each tensor in its smallest encoding (dense, bitmask, CSR, N:M, R x 1 blocks), values optionally
    int8."""
    from prunekit.compress.container import save_compressed
    from prunekit.compress.source import read_source
    from prunekit.files import refuse_same_file
    from prunekit.store import refuse_inside_store

    refuse_same_file(out, source, "--out", "SOURCE")
    refuse_inside_store(out)
    state, specs, extra = read_source(source)
    chosen = tuple(e.strip() for e in encodings.split(",") if e.strip())
    save_compressed(state, out, value_dtype=dtype, specs=specs, encodings=chosen, extra=extra)
    _print_compressed(out, as_json)
