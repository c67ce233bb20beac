"""Crash-safe checkpoints of a recipe run, loaded without executing code.

A checkpoint is one safetensors file: every tensor (weights, masks, optimizer moments, RNG states) is a
tensor in it, and everything else (stage index, round counter, loader position, the run's metrics so far,
the normalized recipe and its hash) is JSON in the file's string metadata. Nothing is pickled, so
loading a checkpoint cannot run code. ``pack`` / ``unpack`` turn nested Python state (dicts with int
keys, tuples, numpy RNG arrays) into that pair and back exactly.

Files in ``DIR/checkpoint/``: ``last.safetensors`` and ``previous.safetensors``. A new checkpoint is
written to a temporary file and fsynced; then ``last`` becomes ``previous`` and the temporary file
becomes ``last`` (two renames). A crash at any point leaves at least one complete checkpoint, and
:func:`load_latest` falls back to ``previous`` when ``last`` is missing, unreadable or damaged.

Integrity: the metadata holds a SHA-256 over every tensor (name, dtype, shape, bytes) and the JSON state,
checked before anything in the file is used, so a damaged checkpoint is never resumed from (a flipped bit
would otherwise continue the run with different weights and finish "successfully" with another result).
Checkpoints of format ``prunekit-checkpoint/1`` (no digest) are refused for that reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from prunekit.artifact import load_artifact
from prunekit.errors import ArtifactCorrupted, PrunekitError
from prunekit.jobs.recipe import EvaluateStage, to_dict
from prunekit.jobs.state import CHECKPOINTED, RunState
from prunekit.masking import load_masked_state_dict, squash
from prunekit.models import build_model
from prunekit.rng import rng_state, set_rng_state
from prunekit.spec import from_dict as spec_from_dict
from prunekit.structured.apply import apply_plan

log = logging.getLogger(__name__)

FORMAT = "prunekit-checkpoint/2"  # 2: with the SHA-256 of its contents
_META_KEY = "prunekit_checkpoint"
_DIGEST_KEY = "sha256"


# -- nested state <-> (JSON, tensors) -------------------------------------------------------------------
def pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj``; its tensors and arrays are moved into ``tensors`` (by reference key)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[pack(k, tensors), pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise PrunekitError(f"cannot checkpoint a value of type {type(obj).__name__}")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__dict__"]}
        raise PrunekitError(f"checkpoint: unknown entry with keys {sorted(obj)}")
    return obj


# -- object state (criteria keep score tensors between steps) --------------------------------------------
def object_state(obj: Any) -> dict[str, Any]:
    """The attributes of ``obj`` that can be checkpointed (tensors, numbers, strings, containers)."""
    out = {}
    for name, value in vars(obj).items():
        try:
            pack(value, {})
        except PrunekitError:
            continue  # e.g. a module reference: rebuilt by the constructor, not state
        out[name] = value
    return out


def load_object_state(obj: Any, state: dict[str, Any]) -> None:
    """Restore attributes; a tensor that already exists with the same shape is copied into in place, so
    an optimizer that holds it keeps working."""
    for name, value in state.items():
        current = getattr(obj, name, None)
        same = isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor)
        if same and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
            continue
        setattr(obj, name, value)


# -- recipe identity -------------------------------------------------------------------------------------
def normalized_recipe(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """The recipe fields that decide the run's results (how often to checkpoint does not)."""
    return {k: v for k, v in recipe_dict.items() if k != "checkpoint"}


def recipe_sha256(recipe_dict: dict[str, Any]) -> str:
    text = json.dumps(normalized_recipe(recipe_dict), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(obj: Any, where: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{where}.{k}" if where else str(k)))
        return out or {where: {}}
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{where}[{i}]"))
        return out or {where: []}
    return {where: obj}


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``'stages[2].pattern: 0.5 -> 0.7'`` for every field that differs (missing fields shown as -)."""
    a, b = _flatten(normalized_recipe(old)), _flatten(normalized_recipe(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "-") != b.get(key, "-"):
            out.append(f"{key}: {json.dumps(a.get(key, '-'))} -> {json.dumps(b.get(key, '-'))}")
    return out


# -- files -----------------------------------------------------------------------------------------------
def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoint"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (JSON-able values, tensors anywhere inside) as the new ``last`` checkpoint."""

    folder = checkpoint_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".next.*.tmp"):  # left by a crash mid-write: never a checkpoint
        stale.unlink(missing_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(pack(state, tensors), separators=(",", ":"))
    digest = _digest(tensors, meta)
    data = st_save(tensors, metadata={"format": FORMAT, _META_KEY: meta, _DIGEST_KEY: digest})
    fd, tmp = tempfile.mkstemp(prefix=".next.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        last, previous = folder / "last.safetensors", folder / "previous.safetensors"
        if last.exists():
            os.replace(last, previous)
        os.replace(tmp, last)
        _fsync_dir(folder)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return last


def _digest(tensors: dict[str, torch.Tensor], meta: str) -> str:
    """SHA-256 over every tensor (in name order: name, dtype, shape, bytes) and the JSON state's text."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(meta.encode("utf-8"))
    return h.hexdigest()


def read(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint file (safetensors only: no code runs), after checking its SHA-256."""

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                old = meta.get("format") == "prunekit-checkpoint/1"
                raise PrunekitError(
                    f"{path} was written by an older prunekit without an integrity check; it cannot be "
                    "trusted to resume from: run without --resume to start over"
                    if old
                    else f"{path} is not a prunekit checkpoint (format {meta.get('format')!r})"
                )
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        text = meta[_META_KEY]
        if _digest(tensors, text) != meta.get(_DIGEST_KEY):
            raise ArtifactCorrupted(
                f"{path} is damaged: its contents do not match the SHA-256 it was saved with"
            )
        return unpack(json.loads(text), tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, PrunekitError):
            raise
        raise PrunekitError(f"{path} is not a readable prunekit checkpoint: {exc}") from None


def load_latest(out: str | Path) -> tuple[dict[str, Any], Path]:
    """The newest intact checkpoint under ``out``: ``last``, else ``previous`` (with a warning naming what
    was wrong with ``last``); both damaged or missing is one line naming each."""
    folder = checkpoint_dir(out)
    problems = []
    for name in ("last.safetensors", "previous.safetensors"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            state = read(path)
        except PrunekitError as exc:
            log.warning("%s", exc)
            problems.append(f"{name}: {str(exc).removeprefix(str(path)).strip(' :')}")
            continue
        if problems:
            log.warning("resuming from %s instead", path)
        return state, path
    if problems:
        raise PrunekitError(
            f"--resume: no intact checkpoint in {folder} ({'; '.join(problems)}); run without --resume "
            "(and with --force) to start over"
        )
    raise PrunekitError(f"--resume: no checkpoint to resume from in {folder}")


# -- recipe runs (prunekit.jobs.state.RunState) -----------------------------------------------------------
def masks_digest(masks: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the masks' names and packed bits, in name order (metrics["masks_sha256"])."""
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].reshape(-1).numpy()).tobytes())
    return h.hexdigest()


def checkpoint_run(run: RunState, stage: int, rounds: int = 0, train_state=None, sparsifier=None) -> None:
    """Checkpoint at ``stage`` (the next stage to run, or the one running with ``rounds`` done) when the
    recipe asks for checkpoints; none once a quantize stage ran (an int8 model is rebuilt by rerunning it)."""
    if run.recipe.checkpoint.enabled and run.int8 is None:
        save_run(run, {"stage": stage, "round": rounds}, train_state, sparsifier)


def save_run(run: RunState, position: dict[str, Any], train_state=None, sparsifier=None) -> None:
    """Checkpoint a run at ``position`` (``stage``: the stage to run or being run, ``round``: its rounds
    done); ``train_state``: the interrupted training's ``state`` function.

    Every rank calls this (the training state sums the loss over the ranks); only rank 0 writes."""

    run.checkpoints += 1
    train = train_state() if train_state is not None else None
    if not run.ctx.main:
        return
    recipe = to_dict(run.recipe)
    state = {
        "count": run.checkpoints,
        "recipe_sha256": recipe_sha256(recipe),
        "recipe": recipe,
        "world_size": run.ctx.world_size,
        "position": {**position, "train": train},
        "sparsifier": None
        if sparsifier is None
        else {"step": sparsifier.step_count, "criterion": object_state(sparsifier.criterion)},
        "run": {name: getattr(run, name) for name in CHECKPOINTED},
        "specs": {name: spec.to_dict() for name, spec in run.specs.items()},
        "model": run.model.state_dict(),
        # the distillation teacher (prunekit.recovery.distill): a plain copy of the model at the run's first
        # prune / structured / quantize stage, so of the run's starting architecture
        "teacher": None if run.teacher is None else run.teacher.state_dict(),
        "timed": [
            {"label": label, "stage": stage.model_dump(mode="json"), "state": model.state_dict()}
            for label, (model, stage) in run.timed.items()
        ],
        "rng": rng_state(),
        "log": list(run.runlog.position()),
        "elapsed_s": run.elapsed(),
    }
    save(run.out, state)
    log.info("checkpoint %d: stage %d, round %d", run.checkpoints, position["stage"], position["round"])


def check_resumable(state: dict[str, Any], path: Path, recipe: dict[str, Any], world_size: int) -> None:
    """Refuse a checkpoint written by another recipe or another number of processes (one line)."""
    if state.get("recipe_sha256") != recipe_sha256(recipe):
        diffs = recipe_differences(state.get("recipe", {}), recipe)
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise PrunekitError(
            f"--resume: the recipe differs from the one {path} was written with: "
            f"{diffs[0] if diffs else 'its hash'}{more}; resume with that recipe, or run without --resume "
            "to start over"
        )
    if int(state.get("world_size", 1)) != world_size:
        raise PrunekitError(
            f"--resume: {path} was written by a run on {state.get('world_size')} process(es), this one has "
            f"{world_size}; resume with the same torchrun --nproc-per-node"
        )


def _architecture(run: RunState, structured: int) -> nn.Module:
    """A fresh model of the run's architecture after its first ``structured`` structured prune logs."""

    if run.recipe.model.artifact is not None:
        model = squash(load_artifact(run.recipe.model.artifact)[0])
    else:
        # the run's own recipe made this model: rebuilding a factory model runs the user's code again
        model = build_model(run.model_info["name"], run.model_info.get("args"), allow_code=True)
    for plan in run.structured_logs[run.initial_structured : structured]:
        apply_plan(model, plan)
    return model


def restore_run(run: RunState, state: dict[str, Any]) -> dict[str, Any]:
    """Put a checkpoint's state into a freshly built ``run``; returns the position to continue from."""

    for name, value in state["run"].items():
        setattr(run, name, value)
    run.specs = {name: spec_from_dict(d) for name, d in state["specs"].items()}
    for plan in run.structured_logs[run.initial_structured :]:
        apply_plan(run.model, plan)
    load_masked_state_dict(run.model, state["model"])
    run.timed = {}
    for entry in state["timed"]:
        model = _architecture(run, run.timed_structured.get(entry["label"], run.initial_structured))
        model.load_state_dict(entry["state"], strict=True)
        run.timed[entry["label"]] = (model.eval(), EvaluateStage(**entry["stage"]))
    if state.get("teacher") is not None:
        teacher = _architecture(run, run.initial_structured)
        teacher.load_state_dict(state["teacher"], strict=True)
        run.teacher = teacher.eval().requires_grad_(False)
    run.checkpoints = int(state["count"])
    run.resumed_elapsed = float(state.get("elapsed_s", 0.0))
    set_rng_state(state["rng"])  # last: building the models above drew from the global generator
    position = dict(state["position"])
    position["sparsifier"] = state.get("sparsifier")
    return position


def restore_sparsifier(sparsifier, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    sparsifier.step_count = int(state["step"])
    load_object_state(sparsifier.criterion, state["criterion"])


def clear(out: str | Path) -> None:
    """Remove the checkpoints of an earlier run in ``out`` (a fresh run must not resume into them)."""
    folder = checkpoint_dir(out)
    for name in ("last.safetensors", "previous.safetensors"):
        (folder / name).unlink(missing_ok=True)
    for stale in folder.glob(".next.*.tmp"):
        stale.unlink(missing_ok=True)


__all__ = [
    "check_resumable",
    "checkpoint_dir",
    "clear",
    "load_latest",
    "pack",
    "read",
    "recipe_differences",
    "recipe_sha256",
    "restore_run",
    "save",
    "save_run",
    "unpack",
]
