"""Turn a ``prunekit run`` / ``demo`` output directory into store entries, one per export stage.

A run directory holds ``metrics.json`` (per evaluate label: accuracy, per-layer ``layers``, the
``recipe`` done so far...; plus the whole ``recipe`` and the ``environment``) and, per export stage
``NAME``, ``NAME.safetensors`` (and ``NAME.compressed.safetensors`` with ``compressed: true``). Each
export's own header records the stages done before it (``extra.stages``): that is its lineage.

Each export's metrics are those of the evaluate stage with the same label, else of the last evaluate
stage before it in the recipe (none: no metrics). Recovery epochs count what was spent fine-tuning
after the first compression stage: every ``finetune`` (and later ``train``) stage, a prune stage's
``finetune`` once per pruning round (once in all for AGP, whose schedule prunes during one training
run), a structured stage's ``finetune``, and QAT epochs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.schedule import Iterative
from prunekit.spec import NM, parse
from prunekit.store import disk

_COMPRESSION = ("prune", "structured", "quantize")


@dataclass(frozen=True)
class PlannedEntry:
    export: str  # the export stage's name
    files: dict[str, Path]
    meta: dict[str, Any]
    base_artifact: Path | None  # the recipe's model.artifact (a stored file there makes the parent)


def _load_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise PrunekitError(
            f"{run_dir} has no metrics.json: give the output directory of `prunekit run` or `prunekit demo`"
        )
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrunekitError(f"{path}: not readable JSON ({exc})") from None
    recipe = metrics.get("recipe") if isinstance(metrics, dict) else None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
        raise PrunekitError(f"{path}: no 'recipe' with 'stages' (is it a `prunekit run` metrics.json?)")
    return metrics


def _rounds(stage: dict[str, Any]) -> int:
    """How many times a prune stage prunes (and fine-tunes), as prunekit.jobs.stages.prune does; without
    building the stage's criterion (that would import torch, seconds for a command that only copies files;
    prunekit.spec and prunekit.schedule do not import it)."""
    schedule = stage.get("schedule") or {}
    kind = schedule.get("type", "one-shot")
    if kind == "agp":
        return 1  # one training run with the pruning steps inside it
    spec = parse(stage["pattern"])
    if isinstance(spec, NM) or kind != "iterative":
        return 1
    rate = schedule.get("rate")
    return len((Iterative(rate) if rate is not None else Iterative()).rounds(spec.sparsity))


def recovery(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Fine-tuning epochs spent after the first compression stage, in all and per stage."""
    detail, compressed = [], False
    for index, stage in enumerate(stages):
        kind = stage.get("type")
        epochs = 0
        if kind in ("finetune", "train") and compressed:
            epochs = int(stage.get("epochs", 0))
        elif kind == "prune" and stage.get("finetune"):
            rounds = _rounds(stage)
            epochs = rounds * int(stage["finetune"]["epochs"])
            detail.append({"stage": index, "type": kind, "rounds": rounds, "epochs": epochs})
            epochs = 0  # recorded with its rounds
        elif kind == "structured" and stage.get("finetune"):
            epochs = int(stage["finetune"]["epochs"])
        elif kind == "quantize" and stage.get("qat"):
            epochs = int(stage["qat"]["epochs"])
        if epochs:
            detail.append({"stage": index, "type": kind, "epochs": epochs})
        compressed = compressed or kind in _COMPRESSION
    return {"epochs": sum(d["epochs"] for d in detail), "stages": detail}


def _method(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The compression stages, without their fine-tuning settings (those are in `recovery`)."""
    drop = ("finetune", "qat", "targets", "calibration_batches")
    return [{k: v for k, v in s.items() if k not in drop} for s in stages if s.get("type") in _COMPRESSION]


def _label_for(stages: list[dict[str, Any]], index: int, name: str, metrics: dict[str, Any]) -> str | None:
    if isinstance(metrics.get(name), dict) and "accuracy" in metrics[name]:
        return name
    before = [s["label"] for s in stages[:index] if s.get("type") == "evaluate" and s.get("label") in metrics]
    return before[-1] if before else None


def plan_run(run_dir: Path) -> list[PlannedEntry]:
    """The entries a run directory makes, in the order of its export stages (its lineage)."""
    if not run_dir.is_dir():
        raise PrunekitError(f"{run_dir} is not a directory (give a `prunekit run` output directory)")
    metrics = _load_metrics(run_dir)
    recipe = metrics["recipe"]
    stages = recipe["stages"]
    exports = [(i, s) for i, s in enumerate(stages) if isinstance(s, dict) and s.get("type") == "export"]
    if not exports:
        raise PrunekitError(f"{run_dir}: the recipe has no export stage, so there is nothing to store")
    env = metrics.get("environment") or {}
    artifact = (recipe.get("model") or {}).get("artifact")
    base = None
    if artifact:
        base = next((p for p in (Path(artifact), run_dir / artifact) if p.is_file()), None)
    plans = []
    for index, stage in exports:
        name = stage["name"]
        files = {f"{name}.safetensors": run_dir / f"{name}.safetensors"}
        if stage.get("compressed"):
            files[f"{name}.compressed.safetensors"] = run_dir / f"{name}.compressed.safetensors"
        for path in files.values():
            if not path.is_file():
                raise PrunekitError(f"the recipe exports '{name}' but {path} is missing")
        header = disk.prunekit_header(files[f"{name}.safetensors"])
        done = (header.get("extra") or {}).get("stages")
        if not isinstance(done, list):  # not written by an export stage: the stages before it in the recipe
            done = [s for s in stages[:index] if s.get("type") not in ("evaluate", "export")]
        label = _label_for(stages, index, name, metrics)
        measured = dict(metrics[label]) if label else {}
        layers = measured.pop("layers", [])
        measured.pop("recipe", None)
        meta = {
            "recipe": {k: v for k, v in recipe.items() if k != "stages"} | {"stages": stages},
            "stages": done,
            "method": _method(done),
            "layers": layers,
            "recovery": recovery(done),
            "metrics": measured,
            "versions": {
                "prunekit": header.get("library_version"),
                "torch": env.get("torch"),
                "python": env.get("python"),
            },
            "source": {
                "run_dir": str(run_dir.resolve()),
                "export": name,
                "metrics_label": label,
                "recipe_name": metrics.get("recipe_name"),
            },
        }
        plans.append(PlannedEntry(name, files, meta, base))
    return plans
