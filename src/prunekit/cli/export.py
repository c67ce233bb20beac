"""``prunekit export onnx SOURCE --out FILE.onnx``: a saved model as one verified ONNX file.

SOURCE is a prunekit artifact (``.safetensors`` from ``prunekit run`` / ``demo``; built-in architectures
are rebuilt and structured prune logs replayed by :func:`prunekit.artifact.load_artifact`) or the output
directory of ``prunekit structured`` (its ``metrics.json`` names the original model and input shape).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from prunekit.errors import PrunekitError

if TYPE_CHECKING:  # torch is imported by the command itself, so `prunekit --help` stays fast
    from torch import nn

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


def _refuse_int8(path: Path) -> None:
    raise PrunekitError(
        f"{path} is an INT8 artifact; ONNX export takes float models: "
        "export the float artifact it was quantized from"
    )


def _from_artifact(path: Path, shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    from prunekit.artifact import load_artifact
    from prunekit.compress.container import is_compressed
    from prunekit.files import safetensors_metadata

    if is_compressed(path):
        raise PrunekitError(
            f"{path} is a compressed artifact; export the artifact it was compressed from "
            "(ONNX holds dense weights)"
        )
    try:  # the header alone says whether the CLI can rebuild the model (load_artifact reports the rest)
        header = json.loads(safetensors_metadata(path).get("prunekit", "{}"))
        recorded, int8 = header.get("model", True), header.get("int8")
    except (ValueError, AttributeError):
        recorded, int8 = True, None
    if int8:
        _refuse_int8(path)
    if recorded is None:
        raise PrunekitError(
            f"{path} records no built-in architecture, so the CLI cannot rebuild the model; export it "
            "from Python: prunekit.export.export_onnx(model, example_inputs, 'model.onnx')"
        )
    model, info = load_artifact(path, masked=True)  # masked: export squashes a copy, zeros and all
    if info.int8:  # a header the quick read above could not parse
        _refuse_int8(path)
    if shape is None and info.model and info.model.get("name") == "resnet-digits":
        # the built-in digits classifier takes 8x8 images; its channel count is in the recorded args
        shape = (1, int((info.model.get("args") or {}).get("in_channels", 1)), 8, 8)
    if shape is None:
        name = (info.model or {}).get("name", "a model passed in by the caller")
        raise PrunekitError(
            f"--input-shape is needed for {path} (its model is {name}, not resnet-digits), "
            "e.g. --input-shape 1,3,224,224"
        )
    return model, shape


def _from_structured_dir(path: Path, shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    from prunekit.jobs.structured import load_model_spec
    from prunekit.structured.storage import LOG, WEIGHTS, load

    missing = [name for name in (LOG, WEIGHTS, "metrics.json") if not (path / name).is_file()]
    if missing:
        raise PrunekitError(
            f"{path} is not a `prunekit structured` output directory (missing {', '.join(missing)}); "
            "SOURCE must be a .safetensors artifact or such a directory"
        )
    try:
        metrics = json.loads((path / "metrics.json").read_text())
        spec, recorded = metrics["model"], tuple(int(d) for d in metrics["input_shape"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrunekitError(
            f"{path / 'metrics.json'}: cannot read 'model' and 'input_shape': {exc}"
        ) from None
    if not spec:
        raise PrunekitError(f"{path / 'metrics.json'} does not name the original model")
    shape = shape or recorded
    model, _ = load_model_spec(spec, shape)  # the unpruned original, rebuilt as `prunekit structured` did
    return load(model, path), shape


def load_source(source: Path, shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    """The model saved at ``source`` and the input shape to export it with."""
    if source.is_dir():
        return _from_structured_dir(source, shape)
    if source.is_file() and source.suffix == ".safetensors":
        return _from_artifact(source, shape)
    if not source.exists():
        raise PrunekitError(f"SOURCE not found: {source}")
    raise PrunekitError(
        f"SOURCE {source}: give a prunekit .safetensors artifact or a `prunekit structured` output directory"
    )


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
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the onnxruntime check."),
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo (default) or torchscript."),
    rtol: float = typer.Option(1e-3, "--rtol", help="Relative tolerance of the check."),
    atol: float = typer.Option(1e-5, "--atol", help="Absolute tolerance of the check."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Export a saved model to one ONNX file, checked with onnxruntime against PyTorch."""
    import torch

    from prunekit.export.onnx import export_onnx

    shape = parse_ints(input_shape) if input_shape else None
    model, shape = load_source(source, shape)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    report = export_onnx(
        model,
        example,
        out,
        opset=opset,
        dynamic_batch=not static_batch,
        verify=not no_verify,
        rtol=rtol,
        atol=atol,
        exporter=exporter,
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    batch = "dynamic batch" if report["dynamic_batch"] else "static batch"
    typer.echo(
        f"wrote {report['path']} ({report['size_bytes']:,} bytes, opset {report['opset']}, {batch}, "
        f"{report['exporter']} exporter)"
    )
    if report["verified"]:
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
) -> None:
    """Export an INT8 model as portable C99 (no heap, no dependencies), with budgets and a host check."""
    from prunekit.export.c import arm_size, export_c, run_check
    from prunekit.export.c.budget import table
    from prunekit.export.c.harness import have
    from prunekit.export.c.source import calibration_inputs, load_source, parse_bytes

    flash, ram = parse_bytes(flash_limit, "--flash-limit"), parse_bytes(ram_limit, "--ram-limit")
    model, splits, artifact = load_source(source, data)
    x_train, x_test, y_test = calibration_inputs(splits), splits.test[:][0], splits.test[:][1]
    result = export_c(
        model,
        out,
        calibration=[x_train],
        test=(x_test, y_test),
        name=name,
        sparse=sparse,
        flash_limit=flash,
        ram_limit=ram,
    )
    checks: dict = {}
    if check:
        checks["host"] = (
            run_check(out) if have("gcc") and have("make") else {"skipped": "gcc or make not on PATH"}
        )
        checks["arm"] = arm_size(out, name)
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
