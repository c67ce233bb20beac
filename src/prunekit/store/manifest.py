"""The manifest of one store entry: plain JSON (``manifest.json``), hashed so an edit is detectable.

    {"format": "prunekit.store.entry", "format_version": 1,
     "name": "demo/pruned",                 # human-friendly, unique in the store
     "parent": "<hash>" | null,             # the entry it was made from (null: a root, the dense original)
     "created": "2026-12-01T11:30:00.123456Z",
     "files": {"pruned.safetensors": {"sha256": "...", "bytes": 737834}, ...},
     "versions": {"prunekit": "0.1.0", "torch": "2.13.0+cpu", "python": "3.11.7"},
     "recipe": {...} | null,                # the recipe that made it (prunekit.jobs.recipe.to_dict)
     "stages": [...],                       # the recipe stages done before it was exported, in order
     "method": [...],                       # the compression stages among them (criterion, pattern, ...)
     "layers": [{"layer": "fc", "sparsity": 0.9, ...}, ...],
     "recovery": {"epochs": 66, "stages": [...]} | null,   # fine-tuning epochs spent recovering accuracy
     "metrics": {"accuracy": 0.98, ...},
     "source": {...} | null, "note": str | null,
     "hash": "<sha256 of the canonical JSON of every field above>"}

The entry's directory is named by its hash, so the name on disk, the manifest and the files all have to
agree for ``verify`` to pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError, did_you_mean
from prunekit.store.disk import json_text

FORMAT = "prunekit.store.entry"
FORMAT_VERSION = 1
SHORT = 12  # hex digits shown for a hash
CURRENT = "current"  # the alias of the entry the current pointer names; not usable as a name
META_KEYS = ("recipe", "stages", "method", "layers", "recovery", "metrics", "source", "note", "versions")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def canonical(data: Any) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, so the hash does not depend on formatting."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "hash"})).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 200 or not _NAME.fullmatch(name) or name == CURRENT:
        raise PrunekitError(
            f"store entry name {name!r}: use letters, digits and . _ + - in parts separated by '/', "
            f"each starting with a letter or digit, at most 200 characters (and not '{CURRENT}'), "
            "e.g. 'edge-digits/pruned'"
        )
    return name


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 200 or not _FILE.fullmatch(name):
        raise PrunekitError(
            f"stored file name {name!r}: a plain file name (letters, digits, . _ + -, no '/'), "
            "e.g. 'pruned.safetensors'"
        )
    return name


def _jsonable(key: str, value: Any) -> Any:
    """Refuse values JSON cannot hold exactly (so a manifest re-read is the manifest written)."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise PrunekitError(
            f"store meta '{key}' must be plain JSON data (dict, list, str, number): {exc}"
        ) from None
    return json.loads(text)


def _layers(value: Any) -> list[dict[str, Any]]:
    """{layer: sparsity} or [{"layer": ..., "sparsity": ...}, ...] -> the list form."""
    if isinstance(value, dict):
        value = [{"layer": k, "sparsity": v} for k, v in value.items()]
    ok = isinstance(value, list) and all(
        isinstance(r, dict)
        and isinstance(r.get("layer"), str)
        and isinstance(r.get("sparsity"), int | float)
        and not isinstance(r.get("sparsity"), bool)
        and (math.isnan(r["sparsity"]) or 0 <= r["sparsity"] <= 1)
        for r in value
    )
    if not ok:
        raise PrunekitError(
            "store meta 'layers' must be {layer: sparsity} or a list of {'layer': name, 'sparsity': 0..1}"
        )
    return value


def normalize_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """Check the caller's metadata (unknown keys are errors, with a suggestion) and fill the defaults."""
    meta = dict(meta or {})
    for key in meta:
        if key not in META_KEYS:
            raise PrunekitError(
                f"unknown store meta key '{key}'{did_you_mean(key, META_KEYS)}; "
                f"allowed: {', '.join(META_KEYS)}"
            )
    out: dict[str, Any] = {k: _jsonable(k, meta.get(k)) for k in META_KEYS}
    out["stages"] = out["stages"] or []
    out["method"] = out["method"] or []
    out["metrics"] = out["metrics"] or {}
    out["layers"] = _layers(out["layers"] or [])
    recovery = out["recovery"]
    if isinstance(recovery, int) and not isinstance(recovery, bool):
        out["recovery"] = recovery = {"epochs": recovery, "stages": []}
    if recovery is not None and not (
        isinstance(recovery, dict) and isinstance(recovery.get("epochs"), int) and recovery["epochs"] >= 0
    ):
        raise PrunekitError("store meta 'recovery' must be a number of epochs >= 0 or {'epochs': n, ...}")
    for key in ("stages", "method"):
        if not isinstance(out[key], list):
            raise PrunekitError(f"store meta '{key}' must be a list of stage dicts")
    if not isinstance(out["metrics"], dict):
        raise PrunekitError("store meta 'metrics' must be a dict, e.g. {'accuracy': 0.98}")
    return out


@dataclass(frozen=True)
class Entry:
    """One stored version: its manifest (read-only view) and where its files are."""

    manifest: dict[str, Any]
    path: Path  # the entry's directory: manifest.json and files/

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def short(self) -> str:
        return self.hash[:SHORT]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def parent(self) -> str | None:
        return self.manifest["parent"]

    @property
    def created(self) -> str:
        return self.manifest["created"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    def file(self, name: str) -> Path:
        """The stored copy of one of the entry's files (read it; never write it)."""
        if name not in self.files:
            raise PrunekitError(
                f"entry '{self.name}' has no file '{name}'{did_you_mean(name, self.files)}; "
                f"it has: {', '.join(sorted(self.files))}"
            )
        return self.path / "files" / name

    @property
    def size_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    @property
    def model_bytes(self) -> int:
        """The smallest file that holds the model (the compressed copy where the entry has one; an entry
        with an artifact and its compressed copy holds the model twice, so size_bytes overstates it)."""
        models = [f["bytes"] for name, f in self.files.items() if name.endswith(".safetensors")]
        return min(models) if models else self.size_bytes


def read_manifest(path: Path, verify: bool = True) -> dict[str, Any]:
    """Parse a manifest.json (plain JSON, never pickle); a damaged one is an error naming the file.

    ``verify`` (what every reader but ``verify`` itself uses): the manifest must hash to the hash it
    records, be byte for byte what the store wrote, and sit in the directory named by that hash, so a
    flipped bit never shows up as a different metric or file list."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrunekitError(f"{path}: not a readable manifest ({exc})") from None
    required = ("format", "format_version", "name", "parent", "created", "files", "hash")
    if not isinstance(data, dict) or data.get("format") != FORMAT or any(k not in data for k in required):
        raise PrunekitError(f"{path}: not a prunekit store manifest (format {FORMAT!r} with {required})")
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise PrunekitError(f"{path}: manifest format_version {version!r} is not a number")
    if version > FORMAT_VERSION:
        raise PrunekitError(
            f"{path}: manifest format_version {data['format_version']} is newer than this prunekit reads "
            f"({FORMAT_VERSION}); upgrade prunekit"
        )
    if not isinstance(data["files"], dict) or not all(
        isinstance(r, dict) and isinstance(r.get("sha256"), str) and isinstance(r.get("bytes"), int)
        for r in data["files"].values()
    ):
        raise PrunekitError(f"{path}: 'files' must map file names to their sha256 and size")
    for key in ("name", "created", "hash"):
        if not isinstance(data[key], str):
            raise PrunekitError(f"{path}: '{key}' must be a string")
    if verify:
        problem = manifest_problem(path, data, raw)
        if problem:
            raise PrunekitError(f"entry '{data['name']}' ({path.parent.name[:SHORT]}): {problem}")
    return data


def manifest_problem(path: Path, data: dict[str, Any], raw: bytes) -> str | None:
    """Why a parsed manifest is not the one the store wrote (None: it is)."""
    rel = f"{path.parent.name[:SHORT]}/manifest.json"
    recomputed = manifest_hash(data)
    if recomputed != data.get("hash"):
        return (
            f"{rel} was changed: its content hashes to {recomputed[:SHORT]}, it records "
            f"{str(data.get('hash'))[:SHORT]}; run `prunekit store verify`"
        )
    if raw != json_text(data).encode("utf-8"):  # same content, other bytes ("\u00e9" -> "\u00E9")
        return f"{rel} was changed: its bytes are not the ones the store wrote; run `prunekit store verify`"
    if path.parent.name != data["hash"]:
        return f"{rel}: its directory does not carry the manifest's hash {data['hash'][:SHORT]}"
    return None
