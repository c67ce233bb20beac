"""Sparse encodings of one tensor: pure functions, tensor in -> named parts out, and back, bit-exact.

- ``dense``: the values as they are.
- ``bitmask``: one bit per element (packed, little bit order) + the non-zero values in row-major order.
- ``csr``: per row (the first dimension) a row pointer, per non-zero its column in the row-major
  flattening of the other dimensions, each with the narrowest unsigned type that holds it, + the values.
- ``nm``: N:M semi-structured in NVIDIA's convention (groups of M consecutive input channels, the second
  dimension, kernel positions moved before it as in :func:`prunekit.select.nm_mask`): N value slots per
  group + ceil(log2 M) bits per slot for the position in its group (2 bits for 2:4).
- ``block``: R x 1 blocks along the output (R consecutive rows of the ``(rows, rest)`` view, one column),
  the layout the batch-1 block kernels run (:mod:`prunekit.runtime.gemv`): per block-row a pointer, per
  kept block its column and its R values contiguous. ``(1 - s)(R * itemsize + index) / R`` bytes per weight.

Zeros are ``x == 0``, so a -0.0 (what ``w * mask`` leaves for negative weights) decodes as +0.0: equal
in value, and the container stores tensors with -0.0 replaced by +0.0 so that decoding is bit-exact
against what it hashed. NaN and infinities are values like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ENCODINGS = ("dense", "bitmask", "csr", "nm", "block")


@dataclass(frozen=True)
class Encoded:
    encoding: str
    parts: dict[str, torch.Tensor]  # "values" and the index parts ("mask", "indptr", "indices", "slots")
    params: dict  # what decoding needs besides the parts (n, m)

    @property
    def value_bytes(self) -> int:
        return _nbytes(self.parts["values"])

    @property
    def index_bytes(self) -> int:
        return sum(_nbytes(t) for k, t in self.parts.items() if k != "values")

    @property
    def total_bytes(self) -> int:
        return self.value_bytes + self.index_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Elements that are not zero (NaN counts as non-zero, -0.0 as zero)."""
    return t != 0


def narrowest_uint(max_value: int) -> torch.dtype:
    """The narrowest unsigned integer type holding ``max_value`` (uint8, uint16, uint32, then int64)."""
    for dtype, limit in ((torch.uint8, 2**8), (torch.uint16, 2**16), (torch.uint32, 2**32)):
        if max_value < limit:
            return dtype
    return torch.int64


def pack_bits(bits: torch.Tensor, bitorder: str = "little") -> torch.Tensor:
    """Flattened bits packed 8 per byte (this format: little bit order; the dense artifact's masks: big)."""
    return torch.from_numpy(np.packbits(bits.reshape(-1).numpy().astype(np.uint8), bitorder=bitorder))


def unpack_bits(packed: torch.Tensor, count: int, bitorder: str = "little") -> torch.Tensor:
    bits = np.unpackbits(packed.numpy(), count=count, bitorder=bitorder)
    return torch.from_numpy(bits.astype(bool))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.dim() else t.reshape(1, 1)


def encode_dense(t: torch.Tensor) -> Encoded:
    return Encoded("dense", {"values": t.contiguous()}, {})


def encode_bitmask(t: torch.Tensor) -> Encoded:
    keep = nonzero_mask(t).reshape(-1)
    return Encoded("bitmask", {"values": t.reshape(-1)[keep].contiguous(), "mask": pack_bits(keep)}, {})


def encode_csr(t: torch.Tensor) -> Encoded:
    rows = _rows(t)
    keep = nonzero_mask(rows)
    counts = keep.sum(dim=1)
    indptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = counts.cumsum(0)
    columns = keep.nonzero()[:, 1]
    parts = {
        "values": rows[keep].contiguous(),
        "indptr": indptr.to(narrowest_uint(int(indptr[-1]))),
        "indices": columns.to(narrowest_uint(max(rows.shape[1] - 1, 0))),
    }
    return Encoded("csr", parts, {})


def _nm_layout(t: torch.Tensor) -> torch.Tensor:
    """(out, *kernel, in): groups run along the last dimension."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def nm_fits(t: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive inputs has at most ``n`` non-zeros."""
    if t.dim() < 2 or t.shape[1] % m or t.numel() == 0:
        return False
    groups = nonzero_mask(_nm_layout(t)).reshape(-1, m)
    return bool((groups.sum(dim=1) <= n).all())


def encode_nm(t: torch.Tensor, n: int, m: int) -> Encoded:
    """N value slots per group of M; a group with fewer non-zeros fills its slots with zeros at its
    lowest-positioned zero entries, so every slot has its own position."""
    if not nm_fits(t, n, m):
        raise ValueError(f"tensor of shape {tuple(t.shape)} is not {n}:{m} sparse along its inputs")
    groups = _nm_layout(t).reshape(-1, m)
    keep = nonzero_mask(groups)
    # non-zeros first, then zeros, each in position order: the first n are the slots, kept in position order
    order = torch.argsort((~keep).to(torch.int8) * m + torch.arange(m), dim=1)[:, :n]
    slots = order.sort(dim=1).values
    values = torch.gather(groups, 1, slots).contiguous()
    bits = max(1, math.ceil(math.log2(m)))
    slot_bits = (slots.unsqueeze(-1) >> torch.arange(bits)) & 1  # little-endian bits of each position
    return Encoded("nm", {"values": values.reshape(-1), "slots": pack_bits(slot_bits)}, {"n": n, "m": m})


def encode_block(t: torch.Tensor, rows: int) -> Encoded:
    """R x 1 blocks of the ``(rows, rest)`` view: a block is kept when any of its R values is non-zero."""
    view = _rows(t)
    if view.shape[0] % rows:
        raise ValueError(f"{view.shape[0]} rows are not a multiple of the block's {rows}")
    tiles = view.reshape(view.shape[0] // rows, rows, view.shape[1])
    keep = nonzero_mask(tiles).any(dim=1)  # (block rows, columns)
    indptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = keep.sum(dim=1).cumsum(0)
    brow, col = keep.nonzero(as_tuple=True)  # row-major: each block-row's columns ascending
    parts = {
        "values": tiles[brow, :, col].contiguous().reshape(-1),
        "indptr": indptr.to(narrowest_uint(int(indptr[-1]))),
        "indices": col.to(narrowest_uint(max(view.shape[1] - 1, 0))),
    }
    return Encoded("block", parts, {"rows": rows, "blocks": int(indptr[-1])})


def decode(enc: Encoded, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The dense tensor ``enc`` encodes."""
    values = enc.parts["values"]
    numel = math.prod(shape)
    if enc.encoding == "dense":
        return values.reshape(shape)
    if enc.encoding == "bitmask":
        keep = unpack_bits(enc.parts["mask"], numel)
        out = torch.zeros(numel, dtype=dtype)
        out[keep] = values
        return out.reshape(shape)
    if enc.encoding == "csr":
        rows = shape[0] if shape else 1
        cols = numel // rows if rows else 0
        indptr = enc.parts["indptr"].to(torch.int64)
        row_of = torch.repeat_interleave(torch.arange(rows), indptr[1:] - indptr[:-1])
        out = torch.zeros(rows, cols, dtype=dtype)
        out[row_of, enc.parts["indices"].to(torch.int64)] = values
        return out.reshape(shape)
    if enc.encoding == "nm":
        n, m = enc.params["n"], enc.params["m"]
        bits = max(1, math.ceil(math.log2(m)))
        layout = (shape[0], *shape[2:], shape[1]) if len(shape) > 2 else shape
        count = numel // m * n
        slot_bits = unpack_bits(enc.parts["slots"], count * bits).reshape(count, bits).to(torch.int64)
        slots = (slot_bits << torch.arange(bits)).sum(dim=1).reshape(-1, n)
        groups = torch.zeros(numel // m, m, dtype=dtype)
        groups.scatter_(1, slots, values.reshape(-1, n))
        out = groups.reshape(layout)
        return out.movedim(-1, 1).contiguous() if len(shape) > 2 else out
    if enc.encoding == "block":
        r = int(enc.params["rows"])
        rows = shape[0] if shape else 1
        cols = numel // rows if rows else 0
        indptr = enc.parts["indptr"].to(torch.int64)
        brow = torch.repeat_interleave(torch.arange(rows // r), indptr[1:] - indptr[:-1])
        tiles = torch.zeros(rows // r, r, cols, dtype=dtype)
        tiles[brow, :, enc.parts["indices"].to(torch.int64)] = values.reshape(-1, r)
        return tiles.reshape(shape)
    raise ValueError(f"unknown encoding '{enc.encoding}'; allowed: {', '.join(ENCODINGS)}")


def candidates(
    t: torch.Tensor, nm: tuple[int, int] | None = None, block_rows: int | None = None
) -> list[Encoded]:
    """Every encoding that applies to ``t``: dense always; bitmask and CSR for tensors with elements;
    N:M for the given (n, m) when the tensor satisfies it; R x 1 blocks for the given ``block_rows`` when
    they divide the rows."""
    out = [encode_dense(t)]
    if t.numel():
        out += [encode_bitmask(t), encode_csr(t)]
    if nm is not None and nm_fits(t, *nm):
        out.append(encode_nm(t, *nm))
    if block_rows and t.dim() >= 2 and t.numel() and t.shape[0] % block_rows == 0:
        out.append(encode_block(t, block_rows))
    return out


def smallest(
    t: torch.Tensor, nm: tuple[int, int] | None = None, allowed=ENCODINGS, block_rows: int | None = None
) -> Encoded:
    """The encoding with the fewest bytes (values + index); ties go to the simpler one (ENCODINGS order)."""
    options = [e for e in candidates(t, nm, block_rows) if e.encoding in allowed]
    if not options:
        raise ValueError(f"none of the encodings {list(allowed)} applies")
    return min(options, key=lambda e: (e.total_bytes, ENCODINGS.index(e.encoding)))
