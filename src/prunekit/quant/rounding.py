"""The one INT8 arithmetic of prunekit: every int8 weight, activation and requantization follows it.

Every consumer computes the same integers from these definitions: the PyTorch int8 modules
(:mod:`prunekit.quant.layers`, :mod:`prunekit.quant.glue`), the CPU runtime's int8 kernels
(:mod:`prunekit.runtime.kernels` jit-compiles :func:`rshift_round` itself), the C export (its ``pk_rshift``
is this function written in C, its NumPy reference calls it) and the QDQ ONNX export (onnxruntime rounds
in float; see docs/onnx.md for why it agrees within one step).

**Float to int8** (weights, and activations where a float tensor enters an int8 layer):

- Weights: per-output-channel symmetric, ``q = round(w / s)`` in [-127, 127], ``s = max|w_row| / 127``
  (1 for an all-zero row), so pruned zeros stay exactly zero.
- Activations: per-tensor symmetric, ``x_q = clamp(round(x / s_x), -127, 127)``, ``s_x = max|x| / 127``
  (1 for an all-zero input), from calibration (static) or from each call (dynamic).

``round`` is torch's: half to even, like ONNX ``QuantizeLinear``.

**Int32 to int8 (requantization), fixed point, integer only** (Jacob et al., "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, section 2.2; here with
one 64-bit product and one rounding shift instead of a Q31 product and a second shift):

- A real multiplier ``m > 0`` (a ratio of float32 scales, computed in float64) becomes ``M`` in
  [2**30, 2**31) and a shift ``sh`` in [1, 62] with ``m ~= M / 2**sh`` (:func:`multiplier`).
- ``requantize(v, M, sh, lo, hi) = clamp(rshift_round(v * M, sh), lo, hi)``, with
  ``rshift_round(y, sh)`` = ``y / 2**sh`` rounded half to even (:func:`rshift_round`).
- An int8 layer: ``v = acc + bias_q``, the exact int32 dot product of ``x_q`` and ``q`` plus the bias on
  the accumulator's grid, ``bias_q = round(bias / (s_x * s_w))`` (int, clamped to +-(2**30 - 1)), as in
  ONNX and TFLite; ``m = (s_x * s_w) / s_out`` with ``s_x * s_w`` one float32 product.
- An add: ``rshift_round(a * Ma + b * Mb, sh)`` with both multipliers at one shift (:func:`add_multipliers`);
  an average pool: ``requantize(window sum, M, sh)``, ``m = s_in / (s_out * count)``.

Bounds that keep every sum inside int64: ``|acc| < 2**31``, ``|bias_q| < 2**30``, ``M < 2**31``, so
``|v * M| + 2**61 < 2**63``.

**Int32 to float (dequantization)**, only where an int8 layer hands its output to float code without a
calibrated output scale (dynamic activations, or a model prunekit cannot trace): ``y = float32(acc) *
(s_x * s_w) + bias`` in float32 (a product, then a sum, never fused).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MAX_SHIFT = 62
BIAS_LIMIT = 2**30 - 1  # |bias_q| bound (module docstring)
WIDE = 65536  # a wide (int32) output is at the int8 output scale / WIDE
INT8_LO, INT8_HI = -127, 127
INT32_LO, INT32_HI = -(2**31), 2**31 - 1


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``q = round(w / s)`` in [-127, 127], ``s = max|w_row| / 127``
    (1 for an all-zero row). Zeros map to exactly zero."""
    rows = w.detach().to(torch.float32).reshape(w.shape[0], math.prod(w.shape[1:]))
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows = q.reshape(q.shape[0], math.prod(q.shape[1:])).to(torch.float32)
    return (rows * scale[:, None]).reshape(q.shape).to(dtype)


def activation_scale(top: Tensor) -> Tensor:
    """The activation scale for the largest input magnitude ``top`` (float32): ``top / 127``, and 1 when
    ``top`` is 0 (an all-zero input). The one rule for dynamic scales and static calibration alike."""
    return torch.where(top > 0, top / 127.0, torch.ones((), dtype=torch.float32))


def quantize_activation(x: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(x_q, s_x)``: int8 values and the float32 scalar scale (``scale`` if given, else dynamic)."""
    x = x.to(torch.float32)
    if scale is None:
        top = x.abs().amax() if x.numel() else torch.zeros((), dtype=torch.float32)
        scale = activation_scale(top)
    scale = scale.to(torch.float32).reshape(())
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


# -- fixed point ------------------------------------------------------------------------------------------
def rshift_round(y, sh):
    """``y / 2**sh`` rounded half to even, for integers ``y`` and shifts ``sh >= 1``: THE rounding of every
    requantization. Written with ``>>`` (a floor) and ``&`` only, so the same source works on Python and
    numba ints, int64 NumPy arrays and int64 torch tensors (elementwise, ``sh`` a scalar or an array).

    ``floor((y + 2**(sh-1) - 1 + (floor(y / 2**sh) & 1)) / 2**sh)``: with ``r = y mod 2**sh``, adding
    ``2**(sh-1) - 1`` carries into the quotient when ``r > 2**(sh-1)``, and the parity bit adds the carry
    at a tie exactly when the quotient is odd."""
    return (y + (1 << (sh - 1)) - 1 + ((y >> sh) & 1)) >> sh


def requantize_value(v, mult, sh, lo, hi):
    """One requantization on integers: ``clamp(rshift_round(v * mult, sh), lo, hi)`` (see
    :func:`requantize`). A plain function of integers: the runtime jit-compiles it for its kernels."""
    y = rshift_round(v * mult, sh)
    return lo if y < lo else (hi if y > hi else y)


def requantize(v: Tensor, mult: Tensor, sh: Tensor, lo: int, hi: int) -> Tensor:
    """``clamp(rshift_round(v * mult, sh), lo, hi)`` on int64 tensors (``mult``/``sh`` broadcast)."""
    return rshift_round(v.to(torch.int64) * mult, sh).clamp_(lo, hi)


def requantize_np(v: np.ndarray, mult, sh, lo: int, hi: int) -> np.ndarray:
    """:func:`requantize` on int64 NumPy arrays (the C export's reference)."""
    v = np.asarray(v, dtype=np.int64)
    return np.clip(rshift_round(v * np.asarray(mult, dtype=np.int64), np.asarray(sh, dtype=np.int64)), lo, hi)


def multiplier(m: float) -> tuple[int, int]:
    """``(M, sh)`` with ``M / 2**sh ~= m``: ``M`` in [2**30, 2**31) (relative error below 2**-31) and
    ``sh`` in [1, 62]. A multiplier below ``2**-32`` loses precision (``sh`` stops at 62); one at or above
    2**30 saturates at ``M = 2**31 - 1, sh = 1`` (its outputs saturate anyway). ``m = 0`` gives (0, 1)."""
    if not math.isfinite(m) or m < 0:
        raise ValueError(f"multiplier: m must be finite and >= 0, got {m}")
    if m == 0:
        return 0, 1
    sh = 31 - math.frexp(m)[1]  # m = f * 2**e, f in [0.5, 1): M = f * 2**31 at sh = 31 - e
    sh = max(1, min(MAX_SHIFT, sh))
    big = round(m * 2.0**sh)
    if big >= 2**31 and sh > 1:  # f rounded up to 1
        sh -= 1
        big = round(m * 2.0**sh)
    return int(min(big, 2**31 - 1)), int(sh)


def add_multipliers(ma: float, mb: float) -> tuple[int, int, int]:
    """``(Ma, Mb, sh)``: both real multipliers at one shift (the larger one's), so an add is
    ``rshift_round(a * Ma + b * Mb, sh)``."""
    _, sh = multiplier(max(ma, mb))
    return min(round(ma * 2.0**sh), 2**31 - 1), min(round(mb * 2.0**sh), 2**31 - 1), sh


def layer_constants(
    act_scale: Tensor, weight_scale: Tensor, bias: Tensor | None, out_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(bias_q, M, sh)`` per output channel (int64) of an int8 layer that writes integers at
    ``out_scale``: ``prod = s_x * s_w`` (one float32 product, as the dequantizing rule computes it),
    ``bias_q = round(bias / prod)`` clamped to +-:data:`BIAS_LIMIT`, ``M / 2**sh ~= prod / out_scale``."""
    prod = (act_scale.to(torch.float32).reshape(()) * weight_scale.to(torch.float32)).double()
    s_out = float(out_scale.to(torch.float32))
    consts = [multiplier(float(p) / s_out) for p in prod]
    if bias is None:
        bias_q = torch.zeros(len(prod), dtype=torch.int64)
    else:
        bias_q = torch.round(bias.to(torch.float32).double() / prod).clamp_(-BIAS_LIMIT, BIAS_LIMIT)
        bias_q = bias_q.to(torch.int64)
    return (
        bias_q,
        torch.tensor([c[0] for c in consts], dtype=torch.int64),
        torch.tensor([c[1] for c in consts], dtype=torch.int64),
    )


def hardswish_table(s_in: float, s_out: float) -> np.ndarray:
    """The int8 lookup table of Hardswish from scale ``s_in`` to ``s_out`` (index ``q + 128``): float32
    ``v * clip(v + 3, 0, 6) / 6`` of ``v = q * s_in``, rounded half to even, clamped to [-127, 127]."""
    q = np.arange(-128, 128, dtype=np.float32)
    v = q * np.float32(s_in)
    hs = v * np.clip(v + np.float32(3), 0, 6).astype(np.float32) / np.float32(6)
    return np.clip(np.rint(hs / np.float32(s_out)), INT8_LO, INT8_HI).astype(np.int8)


def recover(x: Tensor, scale: Tensor) -> Tensor:
    """The integers of a dequantized int8 tensor ``x = float32(q) * scale`` (exact: ``|q|`` is far below
    2**22, so the float32 product and quotient are within a few ulps of ``q``), as int64."""
    return torch.round(x.to(torch.float32) / scale.to(torch.float32)).to(torch.int64)
