"""``prunekit export onnx`` and ``prunekit export c``: load a saved model, export it, verify the export.

ONNX sources are a prunekit artifact (``.safetensors`` from ``prunekit run`` / ``demo``; built-in
architectures are rebuilt and structured prune logs replayed by :func:`prunekit.artifact.load_artifact`) or
the output directory of ``prunekit structured`` (its ``metrics.json`` names the original model and input
shape). C sources are an INT8 artifact or a recipe's output directory (prunekit.export.c.source).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.artifact import load_artifact
from prunekit.compress.container import is_compressed
from prunekit.errors import PrunekitError
from prunekit.export.c import arm_size, export_c, run_check
from prunekit.export.c.harness import have
from prunekit.export.c.source import calibration_inputs, parse_bytes
from prunekit.export.c.source import load_source as load_c_source
from prunekit.export.onnx import export_onnx
from prunekit.files import refuse_same_file, safetensors_metadata
from prunekit.jobs.steps import Steps
from prunekit.jobs.structured import load_model_spec
from prunekit.limits import check_input
from prunekit.models import MODELS
from prunekit.store import refuse_inside_store
from prunekit.structured.storage import LOG, WEIGHTS, load


def _from_artifact(path: Path, shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...]]:
    if is_compressed(path):
        raise PrunekitError(
            f"{path} is a compressed artifact; export the artifact it was compressed from "
            "(ONNX holds dense weights)"
        )
    try:  # the header alone says whether the CLI can rebuild the model (load_artifact reports the rest)
        header = json.loads(safetensors_metadata(path).get("prunekit", "{}"))
        recorded = header.get("model", True)
    except (ValueError, AttributeError):
        recorded = True
    if recorded is None:
        raise PrunekitError(
            f"{path} records no built-in architecture, so the CLI cannot rebuild the model; export it "
            "from Python: prunekit.export.export_onnx(model, example_inputs, 'model.onnx')"
        )
    # masked: export squashes a copy, zeros and all; an INT8 artifact exports as QDQ (export_onnx)
    model, info = load_artifact(path, masked=True)
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
    if not spec or not isinstance(spec, str):
        raise PrunekitError(f"{path / 'metrics.json'} does not name the original model")
    if ":" in spec and not spec.endswith(".safetensors") and spec not in MODELS:
        # `structured --model pkg.module:factory` was the user's own command; read back from a file, the
        # same string would make prunekit import and call whatever the file names
        raise PrunekitError(
            f"{path / 'metrics.json'} names its model by the factory {spec!r}; a file never makes prunekit "
            f"import code: in Python, prunekit.structured.storage.load(<your factory>(), '{path}') and "
            "prunekit.export.export_onnx"
        )
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


def onnx_from_source(
    source: Path, out: Path, shape: tuple[int, ...] | None = None, progress: bool = False, **options: Any
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Export the model saved at ``source`` to ``out`` (prunekit.export.onnx.export_onnx ``options``) on a
    seeded random example of ``shape``; returns the export report and the shape used."""
    refuse_same_file(out, source, "--out", "SOURCE")
    refuse_inside_store(out)
    steps = Steps(["load", "export and check"], "export onnx", progress)
    try:
        with steps("load"):
            model, shape = load_source(source, shape)
            check_input(model, shape)  # before the example (and the exporter's trace) is allocated
            example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with steps("export and check"):
            return export_onnx(model, example, out, **options), shape
    finally:
        steps.close()


def c_from_source(
    source: Path,
    out: Path,
    data: str | None = None,
    *,
    name: str = "model",
    sparse: str = "auto",
    flash_limit: str = "",
    ram_limit: str = "",
    check: bool = True,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """Export the INT8 model at ``source`` as C99 into ``out``; with ``check`` also ``make check`` (gcc) and
    the Cortex-M4 size. Returns the export result, the checks and the artifact used."""
    flash, ram = parse_bytes(flash_limit, "--flash-limit"), parse_bytes(ram_limit, "--ram-limit")
    refuse_same_file(out, source, "--out", "SOURCE")
    refuse_inside_store(out)
    steps = Steps(
        ["load", "export", *(["make check", "Cortex-M4 build"] if check else [])], "export c", progress
    )
    try:
        with steps("load"):
            model, splits, artifact = load_c_source(source, data)
            x_train, x_test, y_test = calibration_inputs(splits), splits.test[:][0], splits.test[:][1]
        with steps("export"):
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
        checks: dict[str, Any] = {}
        if check:
            with steps("make check"):
                checks["host"] = (
                    run_check(out) if have("gcc") and have("make") else {"skipped": "gcc or make not on PATH"}
                )
            with steps("Cortex-M4 build"):
                checks["arm"] = arm_size(out, name)
        return result, checks, artifact
    finally:
        steps.close()
