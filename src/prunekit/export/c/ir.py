"""The integer graph the C code and the NumPy reference both execute.

Every tensor is int8 with a per-tensor scale (``value = q * scale``), except the model output written by
a final int8 layer, which is int32 at ``scale / 65536`` (``wide``) so that class scores keep their order.
Every operator ends in the same requantization (:mod:`prunekit.quant.rounding`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prunekit.quant.rounding import INT8_HI, INT8_LO, INT32_HI, INT32_LO, WIDE

__all__ = ["INT8_HI", "INT8_LO", "INT32_HI", "INT32_LO", "WIDE", "Buffer", "IntGraph", "Op"]


@dataclass
class Buffer:
    name: str
    shape: tuple[int, ...]  # without the batch dimension
    scale: float
    wide: bool = False  # int32 instead of int8
    alias: str | None = None  # shares the memory of this buffer (a flatten)
    external: bool = False  # the caller's input array, not in the arena

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * (4 if self.wide else 1)


@dataclass
class Op:
    """``kind``: conv (Conv2d and Linear), add, requant, lut, maxpool, avgpool, gap, widen."""

    kind: str
    name: str  # the module path it came from (for the budget table)
    inputs: list[str]
    output: str
    lo: int = INT8_LO
    hi: int = INT8_HI
    params: dict[str, Any] = field(default_factory=dict)  # geometry, multipliers (ints)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # weights, per-channel constants, tables
    storage: str = ""  # conv only: dense | csr8 | csr16 (prunekit.export.c.storage)
    stored: Any = None  # conv only: the prunekit.export.c.storage.Stored weights
    options: dict[str, int | None] = field(default_factory=dict)  # conv only: bytes of every form


@dataclass
class IntGraph:
    buffers: dict[str, Buffer]
    ops: list[Op]
    input: str
    output: str  # a wide buffer

    def root(self, name: str) -> str:
        while self.buffers[name].alias is not None:
            name = self.buffers[name].alias
        return name
