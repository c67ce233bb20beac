"""Atomic file writes: write a temporary file in the same directory, flush it to disk, then rename.

A crash or an error mid-write never leaves a file under the final name that looks complete.
"""

from __future__ import annotations

import hashlib
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


def atomic_write_bytes(path: str | Path, data: bytes | bytearray) -> Path:
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


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same file or directory (links and ``..`` resolved; hard links too)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def refuse_same_file(
    out: str | Path, source: str | Path, out_flag: str = "--out", what: str = "the input"
) -> None:
    """One line instead of replacing a command's own input with its output."""
    if same_path(out, source):
        raise PrunekitError(
            f"{out_flag} {out} is {what} itself: writing there would replace the file being read; "
            "choose another output path"
        )


def inside(path: str | Path, directory: str | Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (links resolved)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


SEAL = "sha256"


def _canonical(data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_sealed_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (a dict) as indented JSON with ``"sha256"``: the hash of its canonical form, so a
    reader (:func:`read_sealed_json`) tells an intact file from a damaged or hand-edited one."""
    sealed = {
        **{k: v for k, v in data.items() if k != SEAL},
        SEAL: hashlib.sha256(_canonical(data)).hexdigest(),
    }
    return atomic_write_json(path, sealed)


def read_sealed_json(path: str | Path, what: str) -> dict[str, Any]:
    """The dict :func:`write_sealed_json` wrote, after checking its hash and that its bytes are exactly
    the ones written (a flip JSON reads back as the same data, ``\\u00e9`` -> ``\\u00E9``, is still a
    change); anything else is one line naming ``what``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise PrunekitError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrunekitError(f"{what}: {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get(SEAL), str):
        raise PrunekitError(f"{what}: {path} carries no {SEAL} (damaged, or not written by prunekit)")
    if hashlib.sha256(_canonical(data)).hexdigest() != data[SEAL] or raw != (
        json.dumps(data, indent=2, sort_keys=False) + "\n"
    ).encode("utf-8"):
        raise PrunekitError(f"{what}: {path} was changed after it was written (its {SEAL} does not match)")
    return data
