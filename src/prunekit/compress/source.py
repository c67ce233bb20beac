"""What ``prunekit compress`` reads: a prunekit artifact (weights, the spec of each pruned layer, the
model's recipe for rebuilding it) or any safetensors file of tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, Any]]:
    """(state dict, specs keyed by tensor name, header extras to carry over) of ``path``."""
    from safetensors.torch import load_file

    from prunekit.artifact import read_artifact
    from prunekit.files import safetensors_metadata

    path = Path(path)
    meta = safetensors_metadata(path)
    if "prunekit" not in meta:
        return load_file(str(path)), {}, {"source": path.name}
    if json.loads(meta["prunekit"]).get("format") == "prunekit.compressed":
        raise PrunekitError(f"{path} is already compressed")
    tensors, info = read_artifact(path)
    specs = {f"{layer}.weight": spec.to_dict() for layer, spec in info.specs.items()}
    extra = {"source": path.name, "model": info.model, "structured": info.structured}
    return tensors, specs, extra
