"""``prunekit export onnx SOURCE --out FILE.onnx``: a saved model as one verified ONNX file.

SOURCE is a prunekit artifact (``.safetensors`` from ``prunekit run`` / ``demo``; built-in architectures
are rebuilt and structured prune logs replayed by :func:`prunekit.artifact.load_artifact`) or the output
directory of ``prunekit structured`` (its ``metrics.json`` names the original model and input shape).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from prunekit.errors import PrunekitError

export_app = typer.Typer(no_args_is_help=True, help="Export pruned models for deployment.")


def parse_ints(text: str, field: str = "--input-shape", example: str = "1,3,224,224") -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; anything else is a one-line error naming ``field``."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(d < 1 for d in values):
        raise PrunekitError(
            f"{field} must be positive integers separated by commas, e.g. {example}; got {text!r}"
        )
    return values


def parse_floats(text: str, field: str = "--grid", example: str = "0.5,0.8,0.9") -> tuple[float, ...]:
    """``"0.5,0.8"`` -> ``(0.5, 0.8)``; anything else is a one-line error naming ``field``."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values:
        raise PrunekitError(f"{field} must be numbers separated by commas, e.g. {example}; got {text!r}")
    return values


@export_app.command("onnx")
def onnx_command(
    source: Path = typer.Argument(
        ...,
        metavar="SOURCE",
        help="A prunekit .safetensors artifact or a `prunekit structured` output directory.",
    ),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write."),
    input_shape: str = typer.Option(
        "", "--input-shape", help="Example input shape, e.g. 1,1,8,8 (default for resnet-digits)."
    ),
    opset: int = typer.Option(
        None, "--opset", help="ONNX opset (default: the exporter's; 18 and newer are native)."
    ),
    static_batch: bool = typer.Option(False, "--static-batch", help="Fix the batch size to the example's."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the file in onnxruntime."),
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo (default) or torchscript."),
    rtol: float = typer.Option(1e-3, "--rtol", help="Relative tolerance of the check."),
    atol: float = typer.Option(1e-5, "--atol", help="Absolute tolerance of the check."),
    int8_steps: float = typer.Option(
        1.0, "--int8-steps", help="INT8 models (QDQ): allowed difference in int8 steps of the output."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Export a saved model to one ONNX file (INT8 as QDQ), checked with onnxruntime against PyTorch."""
    from prunekit.jobs.export import onnx_from_source

    report, shape = onnx_from_source(
        source,
        out,
        parse_ints(input_shape) if input_shape else None,
        opset=opset,
        dynamic_batch=not static_batch,
        verify=verify,
        rtol=rtol,
        atol=atol,
        exporter=exporter,
        progress=not (quiet or as_json),
        int8_steps=int8_steps,
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    batch = "dynamic batch" if report["dynamic_batch"] else "static batch"
    typer.echo(
        f"wrote {report['path']} ({report['size_bytes']:,} bytes, opset {report['opset']}, {batch}, "
        f"{report['exporter']} exporter)"
    )
    int8 = report.get("int8")
    if report["verified"] and int8:
        sizes = " and ".join(str(b) for b in report["batch_sizes"])
        typer.echo(
            f"onnxruntime (QDQ) vs prunekit's int8 model: max {int8['max_steps']:.3g} int8 steps of the "
            f"output at batch {sizes} (input {','.join(map(str, shape))}; tolerance {int8_steps:g} steps)"
        )
    elif report["verified"]:
        sizes = " and ".join(str(b) for b in report["batch_sizes"])
        typer.echo(
            f"onnxruntime vs PyTorch: max abs diff {report['max_abs_diff']:.3g} at batch {sizes} "
            f"(input {','.join(map(str, shape))}; tolerance atol {atol:g} + rtol {rtol:g} x |expected|)"
        )
    else:
        typer.echo("not verified (--no-verify)")
    z = report["zero_weights"]
    unmatched = z.get("unmatched") or []
    verdict = "preserved" if z["preserved"] else "NOT all preserved"
    if unmatched:
        verdict += f"; not found in the file: {', '.join(unmatched[:3])}" + (
            ", ..." if len(unmatched) > 3 else ""
        )
    if int8:
        z = {"model": int8["zeros_model"], "onnx": int8["zeros_onnx"]}
        verdict = "preserved" if int8["preserved"] else "NOT all preserved"
    typer.echo(f"exact-zero weights: {z['model']:,} in the model, {z['onnx']:,} in the ONNX file ({verdict})")


@export_app.command("c")
def c_command(
    source: Path = typer.Argument(
        ...,
        metavar="ARTIFACT_OR_RECIPE_OUTPUT",
        help="An INT8 .safetensors artifact or a recipe's --out directory.",
    ),
    out: Path = typer.Option(..., "--out", help="Directory for model.c, model.h, Makefile, budget.json."),
    name: str = typer.Option("model", "--name", help="File stem and C prefix (model_run, ...)."),
    sparse: str = typer.Option("auto", "--sparse", help="auto (smaller flash per layer), always or never."),
    flash_limit: str = typer.Option("", "--flash-limit", help="Fail when flash exceeds this, e.g. 256K."),
    ram_limit: str = typer.Option("", "--ram-limit", help="Fail when RAM exceeds this, e.g. 64K."),
    data: str = typer.Option(None, "--data", help="digits or an .npz file (default: the recipe's data)."),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Run make check (gcc) and the Cortex-M4 build."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the budget and checks as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Export an INT8 model as portable C99 (no heap, no dependencies), with budgets and a host check."""
    from prunekit.export.c.budget import table
    from prunekit.jobs.export import c_from_source

    result, checks, artifact = c_from_source(
        source,
        out,
        data,
        name=name,
        sparse=sparse,
        flash_limit=flash_limit,
        ram_limit=ram_limit,
        check=check,
        progress=not (quiet or as_json),
    )
    if as_json:
        typer.echo(json.dumps({**result, "checks": checks}, indent=2))
        return
    typer.echo(f"wrote {out}/{{{', '.join(result['files'])}}} from {artifact}")
    for line in table(result):
        typer.echo(line)
    ref = result["reference"]
    typer.echo(
        f"NumPy reference on {ref['samples']} test inputs: agreement {ref['agreement']:.4f} with PyTorch "
        "INT8, "
        f"accuracy {ref['accuracy_reference']:.4f} (PyTorch {ref['accuracy_torch']:.4f})"
    )
    host, arm = checks.get("host", {}), checks.get("arm", {})
    if "last_line" in host:
        typer.echo(
            f"make -C {out} check: bit-exact {host['bitexact']}/{host['samples']}; {host['last_line']}"
        )
    elif host:
        typer.echo(f"host check skipped: {host['skipped']}")
    if "text" in arm:
        typer.echo(
            f"arm-none-eabi-size ({arm['flags']}): "
            f"text {arm['text']:,} data {arm['data']:,} bss {arm['bss']:,}"
        )
    elif arm:
        typer.echo(f"Cortex-M4 build skipped: {arm['skipped']}")
    if host.get("returncode"):
        raise typer.Exit(1)
