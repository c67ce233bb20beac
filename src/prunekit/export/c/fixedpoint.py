"""The integer arithmetic of the C export: fixed-point multipliers and one rounding shift.

A real multiplier ``m > 0`` (a ratio of float32 scales) becomes an integer ``M`` in ``[0, 2**31)`` and a
shift ``sh`` in ``[0, 62]`` with ``m ~= M / 2**sh`` (relative error below ``2**-30`` when nothing forces
a smaller shift), as in Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (CVPR 2018), section 2.2, except that the shift is not split into a
Q31 product and a right shift: the product ``y = x * M + B`` is formed in int64 and shifted once.

Every requantization in the export is ``q = clamp(rshift_round(x * M + B, sh), lo, hi)`` with
``rshift_round(y, sh) = floor((y + 2**(sh - 1)) / 2**sh)`` (round half up; ``y`` itself for ``sh = 0``).
The C code (``pk_rshift``) and the NumPy reference (:func:`rshift_round`) compute exactly this; ``floor``
on a negative ``y`` is written out in C so as not to rely on the implementation-defined ``>>`` of
negative numbers.

Bounds that keep every sum inside int64: ``|x| < 2**31`` (an int32 accumulator), ``M < 2**31``, and the
shift is lowered until ``|B|`` plus any fused residual term stays below ``2**60`` (:func:`multiplier`),
so ``|x * M + B + r * R + 2**61| < 2**63``.
"""

from __future__ import annotations

import math

import numpy as np

MAX_SHIFT = 62
BIAS_LIMIT = 2.0**61


def multiplier(m: float, offset: float = 0.0, extra: float = 0.0) -> tuple[int, int, int]:
    """``(M, sh, B)`` for the real multiplier ``m >= 0`` and an additive real ``offset`` (in output units):
    ``x * m + offset ~= (x * M + B) / 2**sh``. ``extra``: the largest further term (in output units) the
    caller adds at the same shift (a fused residual), kept below ``2**60`` together with ``B``."""
    if not (math.isfinite(m) and math.isfinite(offset)) or m < 0:
        raise ValueError(f"multiplier: m must be finite and >= 0, offset finite; got {m}, {offset}")
    sh = MAX_SHIFT if m == 0 else 31 - math.frexp(m)[1]  # m = f * 2**e, f in [0.5, 1): M = f * 2**31
    if offset or extra:  # keep (|offset| + extra) * 2**sh below 2**60
        sh = min(sh, 60 - math.frexp(abs(offset) + abs(extra))[1])
    sh = max(0, min(MAX_SHIFT, sh))
    big = round(m * 2.0**sh)
    while big >= 2**31 and sh > 0:  # rounding reached 2**31: one bit less
        sh -= 1
        big = round(m * 2.0**sh)
    big = min(big, 2**31 - 1)  # m >= 2**31 (an output scale far below the input's): saturates anyway
    bias = round(offset * 2.0**sh)
    bias = int(max(-BIAS_LIMIT + 1, min(BIAS_LIMIT - 1, bias)))
    return int(big), int(sh), bias


def rshift_round(y: np.ndarray, sh: np.ndarray | int) -> np.ndarray:
    """``floor((y + 2**(sh-1)) / 2**sh)`` elementwise on int64 (``y`` where ``sh == 0``)."""
    y = np.asarray(y, dtype=np.int64)
    sh = np.asarray(sh, dtype=np.int64)
    half = np.where(sh > 0, np.left_shift(np.int64(1), np.maximum(sh - 1, 0)), 0).astype(np.int64)
    return np.right_shift(y + half, sh)  # numpy's >> on int64 is arithmetic: floor division by 2**sh


def requantize(
    x: np.ndarray, big: np.ndarray | int, sh: np.ndarray | int, bias: np.ndarray | int, lo: int, hi: int
) -> np.ndarray:
    """``clamp(rshift_round(x * M + B, sh), lo, hi)`` as int64 (the caller narrows)."""
    y = np.asarray(x, dtype=np.int64) * np.asarray(big, dtype=np.int64) + np.asarray(bias, dtype=np.int64)
    return np.clip(rshift_round(y, sh), lo, hi)
