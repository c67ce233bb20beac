"""What ``prunekit compress`` reads: a prunekit artifact (weights, the spec of each pruned layer, the
model's recipe for rebuilding it), a language model directory written by ``prunekit llm prune`` (its
``model.safetensors``, with the pattern of ``metrics.json`` as the spec of every pruned layer, so 2:4 and
R x 1 block weights are stored in the layouts the decode kernels run), or any safetensors file of tensors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from prunekit.artifact import read_artifact
from prunekit.compress.container import is_compressed
from prunekit.errors import ArtifactCorrupted, PrunekitError
from prunekit.files import safetensors_metadata
from prunekit.spec import Spec


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, Any]]:
    """(state dict, specs keyed by tensor name, header extras to carry over) of ``path``."""

    path = Path(path)
    if path.is_dir():
        return read_llm_dir(path)
    meta = safetensors_metadata(path)
    if "prunekit" not in meta:
        try:
            return load_file(str(path)), {}, {"source": path.name}
        except Exception as exc:  # safetensors raises its own error types for a damaged body
            raise ArtifactCorrupted(f"{path}: damaged or truncated ({type(exc).__name__}: {exc})") from None
    if is_compressed(path):
        raise PrunekitError(f"{path} is already compressed")
    tensors, info = read_artifact(path)  # a damaged header or body is its one-line error
    extra = {"source": path.name, "model": info.model, "structured": info.structured}
    if info.int8:
        extra["int8"] = info.int8
    return tensors, tensor_specs(info.specs, tensors), extra


def tensor_specs(specs: Mapping[str, Spec], tensors: Iterable[str]) -> dict[str, dict]:
    """Layer specs keyed by the tensor that holds the layer's weight: ``<layer>.weight``, or
    ``<layer>.weight_q`` for an int8 layer (whose zeros are the same pruned positions)."""
    names = set(tensors)
    out = {}
    for layer, spec in specs.items():
        for key in (f"{layer}.weight", f"{layer}.weight_q"):
            if key in names:
                out[key] = spec.to_dict()
    return out


def read_llm_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, Any]]:
    """(state dict, specs, extras) of a ``prunekit llm prune`` output directory."""
    weights, metrics_file = path / "model.safetensors", path / "metrics.json"
    if not weights.is_file():
        raise PrunekitError(f"{path}: a directory must hold one model.safetensors (a saved language model)")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for a damaged body
        raise ArtifactCorrupted(f"{weights}: damaged or truncated ({type(exc).__name__}: {exc})") from None
    specs: dict[str, dict] = {}
    extra: dict[str, Any] = {"source": f"{path.name}/model.safetensors"}
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PrunekitError(f"{metrics_file}: not valid JSON ({exc})") from None
        pattern = metrics.get("pattern")
        if isinstance(pattern, dict):
            for layer in metrics.get("layer_sparsity", {}):
                if f"{layer}.weight" in state:
                    specs[f"{layer}.weight"] = dict(pattern)
            extra["llm"] = {
                "pattern": pattern,
                "method": metrics.get("method"),
                "model_type": metrics.get("model_type"),
            }
    return state, specs, extra
