"""Atomic file writes: write a temporary file in the same directory, flush it to disk, then rename.

A crash or an error mid-write never leaves a file under the final name that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from prunekit.errors import PrunekitError


def _mode_for(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the existing file's, else 0o666 less the umask.

    ``mkstemp`` creates its file 0o600; without this every output would be private to its owner.
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the only portable way to read the umask is to set it
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged_directory(out: str | Path, replaces: Sequence[str] = ()) -> Iterator[Path]:
    """Write a directory's files into a temporary sibling, then put them in ``out`` only if the block ends
    without an error (a failed save leaves ``out`` as it was and no temporary directory behind).

    A new ``out`` is the renamed temporary directory. Into an existing one each file is moved atomically,
    after the files matching ``replaces`` (globs: weight shards, an index) that the new save does not have
    are removed, so ``out`` never mixes two saves' shards; other files already there are kept.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        if not out.exists():
            os.replace(staging, out)
            return
        new = {item.name for item in staging.iterdir()}
        for pattern in replaces:
            for stale in out.glob(pattern):
                if stale.name not in new:
                    stale.unlink()
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only; the tensors are not read)."""

    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise PrunekitError(f"{path} is not a readable safetensors file: {exc}") from None
