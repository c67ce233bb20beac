"""What ``prunekit export c`` exports: an INT8 artifact or a recipe output directory, with its data.

A recipe output directory (``prunekit run`` / ``prunekit demo``) names its data split in
``metrics.json``, and its last export stage is the model exported. A bare artifact uses ``--data``
(default: ``digits`` for the built-in ``resnet-digits``) with the default split. The first 512
training inputs calibrate the scales no int8 layer fixes; the test split is the harness's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prunekit.artifact import load_artifact
from prunekit.compress.container import is_compressed
from prunekit.data import load_splits
from prunekit.errors import PrunekitError

CALIBRATION_INPUTS = 512  # training inputs that calibrate the scales no int8 layer fixes (8 batches of 64)
_SIZE = re.compile(r"(\d+)\s*([kKmM]i?[bB]?|[bB])?")


def parse_bytes(text: str | None, field: str) -> int | None:
    """``"65536"``, ``"64K"``, ``"1M"`` -> bytes (K = 1024); None stays None."""
    if text is None or text == "":
        return None
    match = _SIZE.fullmatch(text.strip())
    if not match or int(match.group(1)) < 1:
        raise PrunekitError(
            f"{field} must be a positive size in bytes such as 65536, 64K or 1M; got {text!r}"
        )
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * {"b": 1, "k": 1024, "m": 1024 * 1024}[unit]


def _recipe_dir(path: Path) -> tuple[Path, dict[str, Any], int]:
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise PrunekitError(
            f"{path} is not a recipe output directory (no metrics.json); SOURCE must be an INT8 .safetensors "
            "artifact or the --out directory of prunekit run / prunekit demo"
        )
    try:
        recipe = json.loads(metrics_path.read_text())["recipe"]
        names = [s["name"] for s in recipe["stages"] if s.get("type") == "export"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrunekitError(f"{metrics_path}: cannot read the recipe's export stages: {exc}") from None
    if not names:
        raise PrunekitError(f"{path}: the recipe has no export stage, so there is no artifact to export")
    return path / f"{names[-1]}.safetensors", recipe.get("data") or {}, int(recipe.get("seed", 0))


def calibration_inputs(splits) -> Any:
    """The first :data:`CALIBRATION_INPUTS` training inputs (the CLI and the recipe stage use the same)."""
    return splits.inputs("train", CALIBRATION_INPUTS)


def load_source(source: Path, data: str | None):
    """``(model, splits, artifact path)`` for the CLI."""

    if not source.exists():
        raise PrunekitError(f"SOURCE not found: {source}")
    recorded: dict[str, Any] = {}
    seed = 0
    artifact = source
    if source.is_dir():
        artifact, recorded, seed = _recipe_dir(source)
        if not artifact.is_file():
            raise PrunekitError(f"{source}: the last export stage's artifact {artifact.name} is missing")
    elif source.suffix != ".safetensors":
        raise PrunekitError(
            f"SOURCE {source}: give an INT8 .safetensors artifact or a recipe output directory"
        )
    if is_compressed(artifact):
        raise PrunekitError(
            f"{artifact} is a compressed artifact; export the .safetensors it was compressed from "
            "(the C export chooses its own sparse storage per layer)"
        )
    model, info = load_artifact(artifact, masked=False)
    if not info.int8:
        raise PrunekitError(
            f"{artifact} is a float model; the C export needs INT8: add a stage "
            "`{type: quantize, activations: static, classifier: true}` before the export, or use "
            "prunekit.quant.ptq.quantize(model, calibration=batches, classifier=True)"
        )
    name, path = data or recorded.get("name"), recorded.get("path") if data is None else None
    if data is not None and data.endswith(".npz"):
        name, path = "npz", data
    if name is None and (info.model or {}).get("name") == "resnet-digits":
        name = "digits"
    if name is None:
        raise PrunekitError(f"--data is needed for {artifact} (its inputs calibrate and test the C model)")
    kw = {"val": recorded.get("val_fraction", 0.2), "test": recorded.get("test_fraction", 0.2), "seed": seed}
    splits = load_splits(name, path, **kw)
    return model.eval(), splits, artifact
