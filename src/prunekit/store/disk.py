"""Low-level disk operations of the store: an exclusive lock, hashed and fsynced copies, directory fsync.

Everything here is about surviving crashes and concurrent writers:

- :func:`locked` takes an ``fcntl.flock`` on a lock file. The kernel drops the lock when its holder dies
  (even by SIGKILL), so a crashed writer never leaves the store locked.
- :func:`copy_hashed` copies a file while hashing the bytes it writes, fsyncs it, then re-reads the copy
  and checks its SHA-256: a file is stored only if the bytes on disk are the bytes that were read.
- :func:`fsync_dir` makes a rename or a new directory entry durable (POSIX needs the parent fsynced).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from prunekit.errors import PrunekitError

CHUNK = 1 << 20  # 1 MiB reads: large enough to hash at disk speed, small enough to stay off the heap


def _read_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    """The file's bytes in CHUNK pieces (one function, so a test can slow a copy down mid-file)."""
    while chunk := handle.read(CHUNK):
        yield chunk


def sha256_file(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size in bytes of a file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for chunk in _read_chunks(handle):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def copy_hashed(src: Path, dst: Path, expected: str | None = None) -> tuple[str, int]:
    """Copy ``src`` to the new file ``dst`` (which must not exist), fsynced; returns (sha256, bytes).

    The copy is re-read after the fsync and must hash to what was written (and to ``expected`` if given),
    else ``dst`` is removed and the error names both files.
    """
    h, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            for chunk in _read_chunks(fin):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        digest = h.hexdigest()
        if expected is not None and digest != expected:
            raise PrunekitError(f"{src}: sha256 {digest} does not match the manifest's {expected}")
        again, again_size = sha256_file(dst)
        if (again, again_size) != (digest, size):
            raise PrunekitError(f"copying {src} to {dst}: the copy on disk differs from what was read")
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return digest, size


def json_text(data: Any) -> str:
    """The exact text a store JSON file holds (``verify`` compares a manifest's bytes with it)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json_synced(path: Path, data: Any) -> None:
    """Write a new JSON file and fsync it (inside a temp directory that is renamed into place later)."""
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(json_text(data))
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path, blocking: bool = True, create: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` for the block; yields whether it was acquired (always True when
    ``blocking``). Without ``create`` a missing file counts as free (its holder removed it, or never was)."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def hold_lock(path: Path) -> int:
    """Create ``path`` and keep an exclusive flock on it; returns the descriptor (close it to release)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), read without torch.

    Returns {} for a file that is not safetensors: the store keeps any file, this only adds metadata.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return {}
            (length,) = struct.unpack("<Q", raw)
            if length > min(100 << 20, path.stat().st_size - 8):
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def prunekit_header(path: Path) -> dict[str, Any]:
    """The ``prunekit`` JSON entry of a safetensors file's metadata ({} when there is none)."""
    metadata = safetensors_header(path).get("__metadata__") or {}
    try:
        header = json.loads(metadata.get("prunekit", "{}")) if isinstance(metadata, dict) else {}
    except ValueError:
        return {}
    return header if isinstance(header, dict) else {}
