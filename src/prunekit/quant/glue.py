"""The integer operators between int8 layers, as modules: what the model's own adds, pools, ReLU6 and
Hardswish become in an integer model (:func:`prunekit.quant.graph.integerize`).

Every tensor between them is a dequantized int8 tensor, ``float32(q) * s`` with a static per-tensor scale
``s``; each operator recovers ``q`` exactly (:func:`~prunekit.quant.rounding.recover`), computes in
integers by :mod:`prunekit.quant.rounding` and returns its own output the same way. ReLU, max pooling,
flatten and identities need no module of their own: on such a tensor they give another one on the same
grid, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.quant.rounding import (
    INT8_HI,
    INT8_LO,
    add_multipliers,
    hardswish_table,
    multiplier,
    quantize_activation,
    recover,
    requantize,
    rshift_round,
)


def _refresh_after_load(module: nn.Module, incompatible) -> None:
    module.refresh()  # constants derived from the scales just loaded


def _scales(*values: float | Tensor) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _scale(value: float | Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float32).reshape(()).clone()


def _out(q: Tensor, scale: Tensor) -> Tensor:
    return q.to(torch.float32) * scale


class QuantizeInput(nn.Module):
    """Float to int8 where a float input enters the integer graph: ``clamp(round(x / s), -127, 127)``."""

    def __init__(self, scale: float | Tensor = 1.0) -> None:
        super().__init__()
        self.register_buffer("scale", _scale(scale))

    def forward(self, x: Tensor) -> Tensor:
        xq, s = quantize_activation(x, self.scale)
        return _out(xq, s)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.6g}"


class QuantizedAdd(nn.Module):
    """``a + b`` of two int8 tensors: ``clamp(rshift_round(qa * Ma + qb * Mb, sh), -127, 127)`` at
    ``scale_out`` (:func:`~prunekit.quant.rounding.add_multipliers` of ``scale_a / scale_out`` and
    ``scale_b / scale_out``)."""

    def __init__(self, scale_a: float = 1.0, scale_b: float = 1.0, scale_out: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("scales", _scales(scale_a, scale_b, scale_out))  # one tensor: a, b, out
        # Ma, Mb, sh: derived from the scales (not saved; recomputed on load)
        self.register_buffer("consts", torch.zeros(3, dtype=torch.int64), persistent=False)
        self.refresh()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def scale_a(self) -> Tensor:
        return self.scales[0]

    @property
    def scale_b(self) -> Tensor:
        return self.scales[1]

    @property
    def scale_out(self) -> Tensor:
        return self.scales[2]

    def refresh(self) -> None:
        """Recompute the integer constants from the three scales."""
        s_out = float(self.scale_out)
        ma, mb, sh = add_multipliers(float(self.scale_a) / s_out, float(self.scale_b) / s_out)
        self.consts = torch.tensor([ma, mb, sh], dtype=torch.int64)
        self._consts = (ma, mb, sh)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ma, mb, sh = self._consts
        y = rshift_round(recover(a, self.scale_a) * ma + recover(b, self.scale_b) * mb, sh)
        return _out(y.clamp_(INT8_LO, INT8_HI), self.scale_out)

    def extra_repr(self) -> str:
        return f"scales=({float(self.scale_a):.6g}, {float(self.scale_b):.6g}) -> {float(self.scale_out):.6g}"


class _InOut(nn.Module):
    """An operator from one int8 tensor to another: ``scales`` = (in, out), one tensor (each tensor of a
    saved file costs a header entry)."""

    def __init__(self, scale_in: float, scale_out: float) -> None:
        super().__init__()
        self.register_buffer("scales", _scales(scale_in, scale_out))

    @property
    def scale_in(self) -> Tensor:
        return self.scales[0]

    @property
    def scale_out(self) -> Tensor:
        return self.scales[-1]


class _Pool(_InOut):
    def multiplier(self, count: int) -> tuple[int, int]:
        """``(M, sh)`` of ``scale_in / (scale_out * count)``: a window of ``count`` values summed."""
        return multiplier(float(self.scale_in) / (float(self.scale_out) * count))

    def _finish(self, sums: Tensor, count: int) -> Tensor:
        m, sh = self.multiplier(count)
        return _out(requantize(sums.to(torch.int64), m, sh, INT8_LO, INT8_HI), self.scale_out)


class QuantizedAvgPool2d(_Pool):
    """``nn.AvgPool2d`` (zero padding counted, no ceil mode) on int8: window sums, then one
    requantization with ``m = scale_in / (scale_out * kh * kw)``."""

    def __init__(self, kernel, stride, padding, scale_in: float = 1.0, scale_out: float = 1.0) -> None:
        super().__init__(scale_in, scale_out)
        self.kernel_size, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)

    def forward(self, x: Tensor) -> Tensor:
        q = recover(x, self.scale_in).to(torch.float32)  # sums of int8 values: exact in float32
        sums = F.avg_pool2d(q, self.kernel_size, self.stride, self.padding, False, True, divisor_override=1)
        return self._finish(sums, self.kernel_size[0] * self.kernel_size[1])

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class QuantizedGlobalAvgPool(_Pool):
    """Global average pooling on int8 (``AdaptiveAvgPool2d(1)``, ``mean((2, 3))``): the sum over H x W,
    then one requantization with ``m = scale_in / (scale_out * H * W)``. ``keepdim``: (N, C, 1, 1) out,
    else (N, C)."""

    def __init__(self, keepdim: bool = True, scale_in: float = 1.0, scale_out: float = 1.0) -> None:
        super().__init__(scale_in, scale_out)
        self.keepdim = keepdim

    def forward(self, x: Tensor) -> Tensor:
        sums = recover(x, self.scale_in).sum(dim=(2, 3), keepdim=self.keepdim)
        return self._finish(sums, x.shape[2] * x.shape[3])

    def extra_repr(self) -> str:
        return f"keepdim={self.keepdim}"


class QuantizedClamp(nn.Module):
    """ReLU6 (and ``Hardtanh(0, 6)``) on int8: ``clamp(q, 0, hi)`` with ``hi = min(127, round(6 / s))``."""

    def __init__(self, scale: float = 1.0, top: float = 6.0) -> None:
        super().__init__()
        self.register_buffer("scale", _scale(scale))
        self.top = float(top)

    @property
    def hi(self) -> int:
        return int(min(INT8_HI, torch.round(torch.tensor(self.top, dtype=torch.float32) / self.scale)))

    def forward(self, x: Tensor) -> Tensor:
        return _out(recover(x, self.scale).clamp_(0, self.hi), self.scale)


class QuantizedHardswish(_InOut):
    """Hardswish on int8 by its 256-entry table (:func:`~prunekit.quant.rounding.hardswish_table`)."""

    def __init__(self, scale_in: float = 1.0, scale_out: float = 1.0) -> None:
        super().__init__(scale_in, scale_out)
        self.register_buffer("table", torch.zeros(256, dtype=torch.int8), persistent=False)
        self.refresh()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def refresh(self) -> None:
        self.table = torch.from_numpy(hardswish_table(float(self.scale_in), float(self.scale_out)))

    def forward(self, x: Tensor) -> Tensor:
        q = recover(x, self.scale_in).clamp_(-128, 127) + 128
        return _out(self.table[q].to(torch.int64), self.scale_out)


GLUE = (
    QuantizeInput,
    QuantizedAdd,
    QuantizedAvgPool2d,
    QuantizedGlobalAvgPool,
    QuantizedClamp,
    QuantizedHardswish,
)
