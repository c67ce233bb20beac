"""Timing with the caches cold: what a decode step sees when a model's weights exceed the last-level cache.

A language model streams every weight once per generated token; when the weights do not fit in the L3
cache each layer reads its weight from DRAM. Timed hot (the same layer called again and again, its weight
in cache), kernels rank by instructions per weight, not by bytes: measured here, two N:M layouts differed
1.1-1.7x hot but 1.4-2.7x cold, and a bitmask and a CSR layout swapped places. :class:`Flush` reads a buffer
larger than the L3 before each timed call, so every call starts from DRAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_L3 = 32 << 20
_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes() -> int:
    """The largest cache of CPU 0 (Linux sysfs), or 32 MiB when it cannot be read."""
    best = 0
    try:
        for index in _CACHE_DIR.glob("index*"):
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        return DEFAULT_L3
    return best or DEFAULT_L3


class Flush:
    """``flush()`` evicts the caches: one read of every cache line of a buffer twice the L3's size."""

    def __init__(self, nbytes: int | None = None) -> None:
        size = nbytes if nbytes is not None else 2 * last_level_cache_bytes()
        self._buffer = np.ones(max(size // 4, 16), np.float32)
        self._lines = self._buffer[::16]  # one float per 64-byte line: every line is loaded

    def __call__(self) -> float:
        return float(self._lines.sum())
