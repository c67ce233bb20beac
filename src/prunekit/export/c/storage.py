"""How each layer's int8 weight matrix (output channels x fan-in) is stored in flash.

* ``dense``: ``O * K`` bytes.
* ``csr16``: compressed sparse rows with absolute 16-bit column indices: ``3 * nnz`` bytes plus
  ``O + 1`` row pointers (16-bit while the entries fit, else 32-bit). Needs ``K <= 65536``.
* ``csr8``: compressed sparse rows with 8-bit *deltas* from the previous kept column (the first from 0);
  a gap over 255 is bridged by padding entries (delta 255, value 0), so ``2 * (nnz + pads)`` bytes
  plus the row pointers. This is the smallest form at high sparsity of small fan-ins.

:func:`choose` takes the form with the fewest bytes (``auto``), the smaller sparse one (``always``) or
dense (``never``); ties go to dense, which has the simplest inner loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.errors import PrunekitError

MODES = ("auto", "always", "never")
FORMATS = ("dense", "csr8", "csr16")


@dataclass
class Stored:
    fmt: str
    val: np.ndarray  # int8: the dense matrix flattened, or the entries
    idx: np.ndarray | None = None  # uint8 deltas / uint16 columns
    ptr: np.ndarray | None = None  # uint16 / uint32 row starts, O + 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.val, self.idx, self.ptr) if a is not None)


def _ptr(counts: list[int]) -> np.ndarray:
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ptr.astype(np.uint16 if ptr[-1] < 2**16 else np.uint32)


def encode(weight: np.ndarray, fmt: str) -> Stored:
    """``weight`` (O, K) int8 in form ``fmt``."""
    if fmt == "dense":
        return Stored("dense", np.ascontiguousarray(weight, dtype=np.int8).reshape(-1))
    vals, idx, counts = [], [], []
    for row in weight:
        cols = np.flatnonzero(row)
        if fmt == "csr16":
            vals.append(row[cols])
            idx.append(cols)
            counts.append(len(cols))
            continue
        row_vals, row_idx, prev = [], [], 0
        for c in cols:
            gap = int(c) - prev
            while gap > 255:
                row_vals.append(0)
                row_idx.append(255)
                gap -= 255
            row_vals.append(int(row[c]))
            row_idx.append(gap)
            prev = int(c)
        vals.append(np.array(row_vals, dtype=np.int8))
        idx.append(np.array(row_idx, dtype=np.int64))
        counts.append(len(row_vals))
    dtype = np.uint16 if fmt == "csr16" else np.uint8
    flat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    return Stored(fmt, flat(vals, np.int8), flat(idx, dtype), _ptr(counts))


def decode(stored: Stored, shape: tuple[int, int]) -> np.ndarray:
    """The dense (O, K) matrix back (the exact inverse of :func:`encode`; used by the tests)."""
    if stored.fmt == "dense":
        return stored.val.reshape(shape).copy()
    out = np.zeros(shape, dtype=np.int8)
    for o in range(shape[0]):
        a, b = int(stored.ptr[o]), int(stored.ptr[o + 1])
        col = 0
        for j in range(a, b):
            col = col + int(stored.idx[j]) if stored.fmt == "csr8" else int(stored.idx[j])
            if stored.val[j]:
                out[o, col] = stored.val[j]
    return out


def sizes(weight: np.ndarray) -> dict[str, int | None]:
    """Flash bytes of every form (None where a form cannot hold the matrix)."""
    out: dict[str, int | None] = {}
    for fmt in FORMATS:
        out[fmt] = None if fmt == "csr16" and weight.shape[1] > 2**16 else encode(weight, fmt).nbytes
    return out


def choose(weight: np.ndarray, mode: str) -> tuple[Stored, dict[str, int | None]]:
    if mode not in MODES:
        raise PrunekitError(f"--sparse must be one of {', '.join(MODES)}, got {mode!r}")
    options = sizes(weight)
    allowed = {"auto": FORMATS, "always": ("csr8", "csr16"), "never": ("dense",)}[mode]
    best = min((f for f in allowed if options[f] is not None), key=lambda f: (options[f], FORMATS.index(f)))
    return encode(weight, best), options
