"""The weight layouts of the batch-1 kernels (:mod:`prunekit.runtime.gemv_kernels`), packed from a pruned
``(out, in)`` weight. Pure numpy (and torch for the value conversions): importing this compiles nothing.

Values are stored as float32, bfloat16 (uint16 bits, round to nearest even) or int8 (prunekit's one rule,
:func:`prunekit.quant.rounding.quantize_int8`: per output row ``s = max|w_row| / 127``, zeros stay zero, a
small weight may round to zero). A layout keeps what is non-zero *after* that conversion. Outputs are
padded with zero rows to the layout's row unit (R for blocks, 8 for N:M) and the caller slices them off.

Bytes per weight at sparsity ``s`` with ``v`` bytes per value (the bound of a decode step, which streams
every weight once): dense ``v``; block R x 1 ``(1 - s')(v + 2/R)`` with ``s'`` the fraction of empty
blocks; N:M (N = M/2) ``(v + log2(M)/8) / 2`` (2:4: 4 bits of positions per 2 values); CSR-4
``(1 - s)(v + 2)`` plus the padding to 4 per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.quant.rounding import quantize_int8

VALUE_TYPES = ("float32", "bfloat16", "int8")
LAYOUTS = ("dense", "block", "nm", "csr4", "block-vnni")
MAX_COLUMNS = 1 << 16  # uint16 column indices
ROW_GROUP = 8  # rows interleaved per group in the N:M layout
NM_PATTERNS = (4, 8)  # M of the N:M kernels (N = M/2): 2:4 and 4:8
BLOCK_ROWS = (4, 8, 16)  # R of the R x 1 block kernels
VNNI_GROUP = 4  # kept blocks per vpdpbusd step


def nm_chunk(isa: str) -> tuple[int, int]:
    """``(slots, inputs)`` per row per N:M kernel step: 16 of 32 on AVX-512, 8 of 16 on AVX2."""
    return (16, 32) if isa == "avx512" else (8, 16)


def nm_meta_bits(m: int) -> int:
    """Bits per slot position: 2 for 2:4; 4:8's 3-bit positions sit in 4-bit nibbles (2 per byte)."""
    return 2 if m == 4 else 4


@dataclass(eq=False)
class GemvWeight:
    """One layer's weight in one kernel layout. ``arrays`` are what the kernel reads; ``scale`` the int8
    per-row scales (empty otherwise); ``effective`` the dense float32 weight the layout represents."""

    layout: str
    values: str
    shape: tuple[int, int]  # (out, in) of the layer
    rows: int  # outputs including padding rows
    arrays: dict[str, np.ndarray]
    scale: np.ndarray
    effective: torch.Tensor
    params: dict = field(default_factory=dict)  # R (block), m (nm), isa (nm)

    @property
    def nbytes(self) -> int:
        """Bytes a call streams: every array the kernel reads, scales included."""
        return int(sum(a.nbytes for a in self.arrays.values()) + self.scale.nbytes)

    @property
    def bytes_per_weight(self) -> float:
        return self.nbytes / (self.shape[0] * self.shape[1])


def check_values(values: str) -> str:
    if values not in VALUE_TYPES:
        raise PrunekitError(f"values must be one of {', '.join(VALUE_TYPES)}, got {values!r}")
    return values


def stored_values(
    weight: torch.Tensor, values: str, quantized: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """``(stored, scale, effective)``: the values as the kernels store them (float32, uint16 bfloat16 bits or
    int8), the per-row scales (int8 only, else empty) and the dense float32 weight they represent.
    ``quantized``: int8 values and their per-row scales already made (an int8 layer's own), stored as
    they are."""
    check_values(values)
    if quantized is not None:
        q, scale = (t.detach() for t in quantized)
        if values != "int8" or q.dtype != torch.int8 or q.shape != weight.shape:
            raise PrunekitError(
                f"quantized= needs values='int8' and an int8 {tuple(weight.shape)} tensor, got values="
                f"{values!r} and a {q.dtype} {tuple(q.shape)} tensor"
            )
        scale = scale.to(torch.float32).reshape(-1)
        return q.numpy().copy(), scale.numpy().copy(), q.to(torch.float32) * scale[:, None]
    w = weight.detach().to(torch.float32)
    w = torch.where(w == 0, torch.zeros((), dtype=torch.float32), w).contiguous()  # -0.0: all-zero bits
    if values == "float32":
        return w.numpy().copy(), np.zeros(0, np.float32), w.clone()
    if values == "bfloat16":
        b = w.to(torch.bfloat16)
        return (
            b.view(torch.int16).numpy().view(np.uint16).copy(),
            np.zeros(0, np.float32),
            b.to(torch.float32),
        )
    q, scale = quantize_int8(w)
    return q.numpy().copy(), scale.numpy().astype(np.float32), q.to(torch.float32) * scale[:, None]


def _pad_rows(a: np.ndarray, unit: int) -> np.ndarray:
    extra = -a.shape[0] % unit
    return a if not extra else np.concatenate([a, np.zeros((extra, a.shape[1]), a.dtype)])


def _pad_vec(a: np.ndarray, rows: int) -> np.ndarray:
    return a if a.size in (0, rows) else np.concatenate([a, np.ones(rows - a.size, a.dtype)])


def pack_dense(weight: torch.Tensor, values: str = "float32") -> GemvWeight:
    stored, scale, eff = stored_values(weight, values)
    return GemvWeight("dense", values, tuple(stored.shape), stored.shape[0], {"w": stored}, scale, eff)


def block_stats(weight: torch.Tensor, rows: int) -> tuple[float, float]:
    """``(fill, empty)`` of an R x 1 block layout: non-zeros over the weights it stores (1: every kept block
    full), and the fraction of blocks it skips."""
    w = _pad_rows(weight.detach().numpy() != 0, rows)
    tiles = w.reshape(w.shape[0] // rows, rows, -1).any(axis=1)
    kept = int(tiles.sum())
    return (float(w.sum() / (kept * rows)) if kept else 1.0), 1.0 - kept / max(tiles.size, 1)


def pack_block(
    weight: torch.Tensor, rows: int, values: str = "float32", quantized: tuple | None = None
) -> GemvWeight:
    """R x 1 blocks along the output: per block-row the kept input columns (uint16) and R values each
    (``quantized``: see :func:`stored_values`)."""
    out, inn = weight.shape
    if inn > MAX_COLUMNS:
        raise PrunekitError(f"block layout: {inn} inputs exceed the uint16 column index ({MAX_COLUMNS})")
    stored, scale, eff = stored_values(weight, values, quantized)
    src = _pad_rows(stored, rows)
    tiles = src.reshape(src.shape[0] // rows, rows, inn)
    keep = (tiles != 0).any(axis=1)  # (block rows, in)
    ptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    brow, col = np.nonzero(keep)  # row-major: each block-row's columns ascending
    vals = np.ascontiguousarray(tiles[brow, :, col]).reshape(-1)  # (kept blocks * R)
    arrays = {"ptr": ptr, "idx": col.astype(np.uint16), "vals": vals}
    return GemvWeight(
        "block", values, (out, inn), src.shape[0], arrays, _pad_vec(scale, src.shape[0]), eff, {"rows": rows}
    )


def nm_fits(weight: torch.Tensor, m: int) -> bool:
    """Every group of ``m`` consecutive inputs holds at most ``m / 2`` non-zeros."""
    w = weight.detach()
    if w.dim() != 2 or w.shape[1] % m:
        return False
    return bool(((w != 0).reshape(-1, m).sum(dim=1) <= m // 2).all())


def pack_nm(weight: torch.Tensor, m: int, isa: str, values: str = "float32") -> GemvWeight:
    """N:M with N = M/2 (``m`` in 4, 8): per row ``in/2`` value slots and their positions in their group
    (the compressed format's slot order: non-zeros first, free slots on the lowest zero positions, in
    position order), interleaved as (row group of 8, chunk, row, chunk's slots) for ``isa``."""
    if m not in NM_PATTERNS:
        raise PrunekitError(f"N:M kernels take M in {NM_PATTERNS} with N = M/2, got M={m}")
    out, inn = weight.shape
    slots_per_chunk, chunk_inputs = nm_chunk(isa)
    if inn % chunk_inputs or not nm_fits(weight, m):
        raise PrunekitError(
            f"weight {tuple(weight.shape)} is not {m // 2}:{m} with inputs in chunks of {chunk_inputs}"
        )
    stored, scale, eff = stored_values(weight, values)
    src = _pad_rows(stored, ROW_GROUP)
    rows = src.shape[0]
    groups = src.reshape(rows, inn // m, m)
    order = np.argsort((groups == 0) * m + np.arange(m), axis=2, kind="stable")[:, :, : m // 2]
    slots = np.sort(order, axis=2)  # (rows, groups, N) positions
    vals = np.take_along_axis(groups, slots, axis=2).reshape(rows, inn // 2)
    bits = nm_meta_bits(m)
    pos = slots.reshape(rows, inn // 2).astype(np.uint32)
    per_byte = 8 // bits
    pos = pos.reshape(rows, inn // 2 // per_byte, per_byte) << (bits * np.arange(per_byte, dtype=np.uint32))
    meta = pos.sum(axis=2).astype(np.uint8)  # (rows, meta bytes per row)
    steps = inn // chunk_inputs
    meta_bytes = slots_per_chunk * bits // 8
    vals = vals.reshape(rows // ROW_GROUP, ROW_GROUP, steps, slots_per_chunk).transpose(0, 2, 1, 3)
    meta = meta.reshape(rows // ROW_GROUP, ROW_GROUP, steps, meta_bytes).transpose(0, 2, 1, 3)
    arrays = {"meta": np.ascontiguousarray(meta).reshape(-1), "vals": np.ascontiguousarray(vals).reshape(-1)}
    return GemvWeight(
        "nm", values, (out, inn), rows, arrays, _pad_vec(scale, rows), eff, {"m": m, "isa": isa}
    )


def pack_csr4(weight: torch.Tensor, values: str = "float32") -> GemvWeight:
    """CSR with uint16 columns, each row padded to a multiple of 4 entries (column 0, value 0)."""
    out, inn = weight.shape
    if inn > MAX_COLUMNS:
        raise PrunekitError(f"csr4 layout: {inn} inputs exceed the uint16 column index ({MAX_COLUMNS})")
    stored, scale, eff = stored_values(weight, values)
    nz = stored != 0
    counts = nz.sum(axis=1)
    ptr = np.concatenate([[0], np.cumsum((counts + 3) // 4 * 4)]).astype(np.int64)
    rows, cols = np.nonzero(nz)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    dest = ptr[rows] + np.arange(rows.size) - first[rows]
    idx = np.zeros(ptr[-1], np.uint16)
    vals = np.zeros(ptr[-1], stored.dtype)
    idx[dest], vals[dest] = cols, stored[rows, cols]
    arrays = {"ptr": ptr, "idx": idx, "vals": vals}
    return GemvWeight("csr4", values, (out, inn), out, arrays, scale, eff)


def pack_block_vnni(weight: torch.Tensor, rows: int, quantized: tuple | None = None) -> GemvWeight:
    """int8 R x 1 blocks for ``vpdpbusd``: each block-row's kept columns padded to a multiple of 4 (column 0,
    zero weights); per group of 4 blocks 4 uint16 columns and R x 4 weights (lane r: w[r, c0..c3]); plus
    ``128 * sum(q_row)`` for the unsigned-activation correction (``quantized``: see :func:`stored_values`)."""
    out, inn = weight.shape
    if inn > MAX_COLUMNS:
        raise PrunekitError(f"block layout: {inn} inputs exceed the uint16 column index ({MAX_COLUMNS})")
    stored, scale, eff = stored_values(weight, "int8", quantized)
    src = _pad_rows(stored, rows)
    tiles = src.reshape(src.shape[0] // rows, rows, inn)
    keep = (tiles != 0).any(axis=1)
    counts = keep.sum(axis=1)
    gptr = np.concatenate([[0], np.cumsum((counts + 3) // 4)]).astype(np.int64)
    brow, col = np.nonzero(keep)
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    pos = np.arange(brow.size) - first[brow]
    slot = gptr[brow] * 4 + pos  # block slot: group * 4 + lane
    idx = np.zeros(gptr[-1] * 4, np.uint16)
    idx[slot] = col
    vals = np.zeros((gptr[-1], rows, 4), np.int8)
    vals[slot // 4, :, slot % 4] = tiles[brow, :, col]
    wsum = (128 * src.astype(np.int64).sum(axis=1)).astype(np.int32)
    arrays = {"gptr": gptr, "idx": idx, "vals": vals.reshape(-1), "wsum128": wsum}
    return GemvWeight(
        "block-vnni",
        "int8",
        (out, inn),
        src.shape[0],
        arrays,
        _pad_vec(scale, src.shape[0]),
        eff,
        {"rows": rows},
    )


def block_from_parts(
    values: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    rows: int,
    shape: tuple[int, int],
    value_type: str,
    scale: np.ndarray,
    effective: torch.Tensor,
) -> GemvWeight:
    """The block layout straight from the compressed format's ``block`` parts (the same order: per
    block-row its kept columns ascending, R values each), without re-packing: only the index types widen
    to the kernel's (int64 pointers, uint16 columns)."""
    out, inn = shape
    if inn > MAX_COLUMNS:
        raise PrunekitError(f"block layout: {inn} inputs exceed the uint16 column index ({MAX_COLUMNS})")
    arrays = {
        "ptr": np.ascontiguousarray(indptr, dtype=np.int64),
        "idx": np.ascontiguousarray(indices, dtype=np.uint16),
        "vals": np.ascontiguousarray(values),
    }
    return GemvWeight("block", value_type, (out, inn), out, arrays, scale, effective, {"rows": rows})
