"""Sparse weight storage for the CPU kernels: CSR, optionally split into column blocks. Pure numpy.

One format serves both kernel layouts (``prunekit.runtime.kernels``): ``indptr`` has one row per column
block (a plain CSR is one block), column indices are local to their block and stored in the narrowest
unsigned dtype that holds the block width (uint8/uint16/uint32): fewer bytes streamed per nonzero, and
unsigned so the kernels need no sign extension. ``indptr`` stays int64: it has only ``out + 1`` entries per
block, and one dtype there keeps the number of compiled kernel variants down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prunekit.errors import PrunekitError

# Integer sums of int8 x int8 products stay exact in float32 while every partial sum is below 2**24.
FLOAT32_EXACT = 2**24


def index_dtype(width: int) -> np.dtype:
    """The narrowest unsigned dtype for column indices in ``[0, width)``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if width - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


@dataclass(frozen=True, eq=False)
class SparseWeight:
    """A 2-D weight (out x in) as block CSR; ``vals`` float32 or int8."""

    shape: tuple[int, int]
    indptr: np.ndarray  # (blocks, out + 1) int64, global offsets into idx/vals
    idx: np.ndarray  # column index within the block
    vals: np.ndarray
    block: int  # inputs per column block
    _splits: dict = field(default_factory=dict, repr=False)  # row_splits cache

    def row_splits(self, chunks: int) -> np.ndarray:
        """``chunks + 1`` row boundaries with about the same number of nonzeros between each pair."""
        found = self._splits.get(chunks)
        if found is None:
            per_row = (self.indptr[:, 1:] - self.indptr[:, :-1]).sum(axis=0)
            cum = np.concatenate([[0], np.cumsum(per_row)])
            targets = cum[-1] * np.arange(chunks + 1) / max(chunks, 1)
            found = np.searchsorted(cum, targets, side="left").clip(0, self.shape[0]).astype(np.int64)
            found[0], found[-1] = 0, self.shape[0]
            found = np.maximum.accumulate(found)
            self._splits[chunks] = found
        return found

    @property
    def nnz(self) -> int:
        return int(self.vals.size)

    @property
    def sparsity(self) -> float:
        total = self.shape[0] * self.shape[1]
        return 1.0 - self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.idx.nbytes + self.vals.nbytes)

    @property
    def blocks(self) -> int:
        return int(self.indptr.shape[0])


def pack(weight: np.ndarray, block: int | None = None) -> SparseWeight:
    """Pack a dense 2-D array (float32 or int8) keeping its exact nonzeros; ``block`` inputs per column
    block (None: one block)."""
    if weight.ndim != 2:
        raise PrunekitError(f"sparse weights must be 2-D (out x in), got shape {weight.shape}")
    out, inn = weight.shape
    block = inn if block is None or block >= inn else int(block)
    if block < 1:
        block = 1
    starts = range(0, max(inn, 1), block)
    indptr = np.zeros((len(starts), out + 1), dtype=np.int64)
    idx_parts, val_parts, offset = [], [], 0
    for b, start in enumerate(starts):
        part = weight[:, start : start + block]
        rows, cols = np.nonzero(part)  # row-major order: each row's entries are contiguous and sorted
        indptr[b, 1:] = offset + np.cumsum(np.bincount(rows, minlength=out))
        indptr[b, 0] = offset
        offset += rows.size
        idx_parts.append(cols.astype(index_dtype(block)))
        val_parts.append(part[rows, cols])
    idx = np.ascontiguousarray(np.concatenate(idx_parts))
    vals = np.ascontiguousarray(np.concatenate(val_parts))
    return SparseWeight((out, inn), indptr, idx, vals, block)


def unpack(w: SparseWeight) -> np.ndarray:
    """The dense array again (tests, debugging)."""
    dense = np.zeros(w.shape, dtype=w.vals.dtype)
    for b in range(w.blocks):
        for r in range(w.shape[0]):
            lo, hi = w.indptr[b, r], w.indptr[b, r + 1]
            dense[r, b * w.block + w.idx[lo:hi].astype(np.int64)] = w.vals[lo:hi]
    return dense


def int8_row_bound(q: np.ndarray) -> int:
    """``127 * max_r sum_k |q[r, k]|``: the largest |partial sum| an int8 activation row can produce."""
    if q.size == 0:
        return 0
    return 127 * int(np.abs(q.astype(np.int64)).sum(axis=1).max())
