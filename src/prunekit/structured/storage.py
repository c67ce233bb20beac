"""Save a structurally pruned model as a replayable prune log (JSON) plus its weights (safetensors).

``load(fresh_model, path)`` applies the log to an unpruned instance of the same architecture, then loads
the weights: no pickle, so loading cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from prunekit import __version__
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json
from prunekit.structured.apply import apply_plan

LOG = "prune_log.json"
WEIGHTS = "model.safetensors"
FORMAT = "prunekit.structured"


def save(model: nn.Module, plan: dict, path: str | Path) -> Path:
    """Write ``path/prune_log.json`` and ``path/model.safetensors``; returns the directory."""

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_model stores tied weights (an LM head sharing the embedding) once; write, then rename
    tmp = path / f".{WEIGHTS}.tmp"
    try:
        save_model(model, str(tmp))
        os.replace(tmp, path / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(
        path / LOG, {"format": FORMAT, "format_version": 1, "library_version": __version__, "removed": plan}
    )
    return path


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild the pruned model from an unpruned instance ``model`` (modified in place and returned)."""

    path = Path(path)
    try:
        log = json.loads((path / LOG).read_text())
    except (OSError, ValueError) as exc:
        raise PrunekitError(f"cannot read the prune log {path / LOG}: {exc}") from None
    if not isinstance(log, dict) or log.get("format") != FORMAT:
        raise PrunekitError(f"{path / LOG} is not a prunekit structured prune log")
    try:
        apply_plan(model, log["removed"])
    except (AttributeError, KeyError, IndexError, RuntimeError) as exc:
        raise PrunekitError(f"the prune log does not fit this model: {exc}") from None
    try:
        load_model(model, str(path / WEIGHTS), strict=True)
    except (OSError, SafetensorError) as exc:
        raise PrunekitError(f"cannot read {path / WEIGHTS}: {exc}") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PrunekitError(f"weights do not fit the rebuilt model: {first}") from None
    return model
