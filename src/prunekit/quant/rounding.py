"""The one INT8 rounding rule of prunekit: every int8 weight, activation and requantization follows it.

Weights: per-output-channel symmetric int8, ``q = round(w / s)`` in [-127, 127], ``s = max|w_row| / 127``
(1 for an all-zero row), so pruned zeros stay exactly zero. Activations: per-tensor symmetric int8,
``x_q = clamp(round(x / s_x), -127, 127)`` with ``s_x = max|x| / 127`` (1 for an all-zero input), from
calibration (static) or from each call (dynamic). ``round`` is torch's: half to even.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
