"""Who owns a run directory: a run never overwrites its own inputs, and never mixes with another run.

Every run writes ``OUT/run.json`` first (the recipe, its hash, when it started). A directory that already
holds a run's files (``run.json``, or from runs older than it ``metrics.json``, ``log.jsonl``, a
checkpoint) belongs to that run:

- ``--resume`` continues it (the recipe must be the same: the checkpoint's check names what differs);
- ``--force`` deletes every file that run wrote (its exports, reports, log, checkpoints, run.json; the
  user's own files stay) before anything else is written, so the directory never holds files of two runs;
- otherwise the run is refused in one line, before any work.

A run whose exports would replace a file the recipe reads (``model.artifact``, ``data.path``) is refused
too, and ``--force`` never deletes a file the new recipe reads.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json, inside, same_path
from prunekit.jobs.checkpoint import checkpoint_dir, load_latest, recipe_differences, recipe_sha256
from prunekit.jobs.recipe import Recipe, to_dict

RUN_FILE = "run.json"
FORMAT = "prunekit.run"
_FIXED = ("metrics.json", "report.md", "report.html", "log.jsonl")  # and report-*.png, checkpoint/


@dataclass
class EarlierRun:
    """The run whose files are in a directory."""

    name: str  # its recipe's name ("?" when nothing says)
    recipe_sha256: str | None
    exports: list[str] = field(default_factory=list)  # its export stages' names
    started: str | None = None
    recipe: dict | None = None  # from run.json (a resume with another recipe names the difference)


def _plain(name: Any) -> bool:
    """An export name as ExportStage allows it: a file stem, never a path (the names come from files
    here, and decide what --force deletes)."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and not set(name) & {"/", "\\", "\0"}
    )


def _exports(recipe: Any) -> list[str]:
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    return [
        s["name"]
        for s in (stages if isinstance(stages, list) else [])
        if isinstance(s, dict) and s.get("type") == "export" and _plain(s.get("name"))
    ]


def _checkpoint_recipe(out: Path) -> dict | None:
    """The recipe of the newest intact checkpoint (what a run that died before metrics.json ran)."""
    try:
        state, _ = load_latest(out)
    except PrunekitError:
        return None
    recipe = state.get("recipe")
    return recipe if isinstance(recipe, dict) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def earlier_run(out: Path) -> EarlierRun | None:
    """The run whose files ``out`` holds, or None (a new or empty directory, or only the user's files)."""
    if not out.is_dir():
        return None
    marker = out / RUN_FILE
    if marker.exists():
        data = _read_json(marker)
        if not isinstance(data, dict) or data.get("format") != FORMAT:  # damaged: still a run's directory
            recipe = _checkpoint_recipe(out)
            return EarlierRun(str((recipe or {}).get("name", "?")), None, _exports(recipe))
        recipe = data.get("recipe")
        return EarlierRun(
            str((recipe or {}).get("name", "?")) if isinstance(recipe, dict) else "?",
            data.get("recipe_sha256") if isinstance(data.get("recipe_sha256"), str) else None,
            _exports(recipe),
            data.get("started") if isinstance(data.get("started"), str) else None,
            recipe if isinstance(recipe, dict) else None,
        )
    folder = checkpoint_dir(out)
    legacy = [out / name for name in _FIXED] + [folder / "last.safetensors", folder / "previous.safetensors"]
    if not any(p.exists() for p in legacy):
        return None
    metrics = _read_json(out / "metrics.json")  # a run from before run.json: what its files say
    recipe = metrics.get("recipe") if isinstance(metrics, dict) else None
    if not isinstance(recipe, dict):
        recipe = _checkpoint_recipe(out)
    if isinstance(recipe, dict):
        return EarlierRun(str(recipe.get("name", "?")), recipe_sha256(recipe), _exports(recipe))
    return EarlierRun("?", None)


def outputs(out: Path, exports: list[str]) -> list[Path]:
    """Every file or directory a run with these exports writes into ``out`` (existing ones)."""
    paths = [out / name for name in (*_FIXED, RUN_FILE)] + sorted(out.glob("report-*.png"))
    for name in exports:
        paths += [out / f"{name}.safetensors", out / f"{name}.compressed.safetensors", out / f"{name}-c"]
    # an atomic write interrupted by a crash leaves `.<name>.<random>.tmp` beside its target
    paths += [tmp for p in list(paths) for tmp in sorted(out.glob(f".{glob.escape(p.name)}.*.tmp"))]
    paths.append(checkpoint_dir(out))
    return [p for p in paths if p.exists() or p.is_symlink()]


def inputs(recipe: Recipe) -> dict[str, Path]:
    """The files the recipe reads, by the field that names them."""
    found = {}
    if recipe.model.artifact is not None:
        found["model.artifact"] = Path(recipe.model.artifact)
    if recipe.data.path is not None:
        found["data.path"] = Path(recipe.data.path)
    return found


def check_inputs(recipe: Recipe, out: Path) -> None:
    """Refuse a recipe whose outputs in ``out`` would replace a file it reads."""
    mine = outputs_of(out, recipe)
    for field_name, path in inputs(recipe).items():
        for target in mine:
            if same_path(target, path):
                raise PrunekitError(
                    f"--out {out}: the run would write {target.name} over {path}, which the recipe reads "
                    f"({field_name}); choose another --out or move the file"
                )


def outputs_of(out: Path, recipe: Recipe) -> list[Path]:
    """The files this recipe writes (existing or not)."""
    names = [s.name for s in recipe.stages if s.type == "export"]
    paths = [out / name for name in (*_FIXED, RUN_FILE)]
    for name in names:
        paths += [out / f"{name}.safetensors", out / f"{name}.compressed.safetensors"]
    return paths


def check_owner(out: Path, recipe: Recipe, resume: bool, force: bool) -> EarlierRun | None:
    """Refuse to write into another run's directory unless ``resume`` (same recipe) or ``force``; returns
    the earlier run (for :func:`clear`) when there is one. Reads only: safe on every rank at once."""
    if resume and force:
        raise PrunekitError("--resume continues the run in --out, --force deletes it: give one of them")
    earlier = earlier_run(out)
    if earlier is None:
        return None
    what = f"the files of an earlier run (recipe '{earlier.name}'" + (
        f", started {earlier.started[:19].replace('T', ' ')} UTC)" if earlier.started else ")"
    )
    if resume:  # run.json's recipe here; the checkpoint's is checked next (prunekit.jobs.checkpoint)
        if earlier.recipe is not None and recipe_sha256(earlier.recipe) != recipe_sha256(to_dict(recipe)):
            diffs = recipe_differences(earlier.recipe, to_dict(recipe))
            more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
            raise PrunekitError(
                f"--resume: the recipe differs from the one {out / RUN_FILE} was written with: "
                f"{diffs[0] if diffs else 'its hash'}{more}; resume with that recipe, or start over with "
                "--force"
            )
        return earlier
    if not force:
        raise PrunekitError(
            f"--out {out} holds {what}; --resume to continue it (same recipe), --force to delete its files "
            "and start over, or choose another --out"
        )
    doomed = outputs(out, earlier.exports)
    for field_name, path in inputs(recipe).items():
        for target in doomed:
            if same_path(target, path) or (target.is_dir() and inside(path, target)):
                raise PrunekitError(
                    f"--force would delete {target}, which the recipe reads ({field_name}); move it out of "
                    f"--out {out} first"
                )
    return earlier


def clear(out: Path, earlier: EarlierRun) -> list[Path]:
    """Delete every file ``earlier`` wrote into ``out`` (rank 0 only); returns what was deleted."""
    deleted = outputs(out, earlier.exports)
    for path in deleted:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if earlier_run(out) is not None:  # what it left can only be something no run writes
        raise PrunekitError(f"--force: {out} still holds files of the earlier run after clearing it")
    return deleted


def mark(out: Path, recipe: Recipe) -> None:
    """Write ``run.json``: this directory now belongs to this run (rank 0, before any other file)."""
    recipe_dict = to_dict(recipe)
    atomic_write_json(
        out / RUN_FILE,
        {
            "format": FORMAT,
            "recipe_sha256": recipe_sha256(recipe_dict),
            "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "recipe": recipe_dict,
        },
    )
