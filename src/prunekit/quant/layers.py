"""INT8 after pruning: the int8 layers, computing by :mod:`prunekit.quant.rounding` (the one arithmetic).

Weights: per-output-channel symmetric int8 (:func:`~prunekit.quant.rounding.quantize_int8`), so pruned zeros
stay exactly zero. Input: the float input is rounded to int8 at ``act_scale`` (static, calibrated) or at
``max|x| / 127`` of each call (dynamic). ``acc`` is the exact integer dot product (int32 in a kernel;
computed here in float64, exact far beyond any layer's size).

Output, one of two forms:

- **integer** (``out_scale`` set, by :func:`prunekit.quant.graph.integerize` for static models that trace):
  ``q = requantize(acc + bias_q, M, sh, lo, hi)``, the fixed-point rule, into int8 ([-127, 127]) or, where
  float code or the model's output reads it, int32 at ``out_scale`` (a 65536th of the int8 scale the
  calibration gives). The module returns ``float32(q) * out_scale``: the next integer operator recovers
  ``q`` exactly from it (:func:`~prunekit.quant.rounding.recover`), so the whole model computes the integers
  the C export and the runtime compute.
- **float** (no ``out_scale``: dynamic activations, or a model that does not trace):
  ``y = float32(acc) * (s_x * s_w) + bias``, one float32 product and one float32 sum.

The CPU runtime's int8 kernels reproduce both bit for bit. Converting a model:
:func:`prunekit.quant.ptq.quantize` (BatchNorm folding :mod:`prunekit.quant.fold`, quantization-aware
fine-tuning :mod:`prunekit.quant.qat`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.quant.rounding import (
    INT8_HI,
    INT8_LO,
    INT32_HI,
    INT32_LO,
    layer_constants,
    quantize_activation,
    quantize_int8,
    requantize,
)


class QuantizedLayer(nn.Module):
    """Shared buffers: ``weight_q`` (int8), ``weight_scale`` (float32, one per output channel),
    ``act_scale`` (float32 scalar, or None for dynamic activations), ``bias`` (float32 or None); for the
    integer output form also ``out_scale`` (float32 scalar) and, derived from the scales and the bias by
    :func:`~prunekit.quant.rounding.layer_constants` (so not saved: recomputed, identically, on load),
    ``bias_q``, ``out_mult`` (int32), ``out_shift`` (int8), one per output channel, and ``out_range``
    (int64 ``[lo, hi]``: int8, or int32 for the wide form)."""

    _DERIVED = ("bias_q", "out_mult", "out_shift", "out_range")

    def _init_buffers(self, weight: Tensor, bias: Tensor | None, act_scale: Tensor | None) -> None:
        q, scale = quantize_int8(weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.register_buffer("act_scale", None if act_scale is None else act_scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.register_buffer("out_scale", None)
        for name in self._DERIVED:
            self.register_buffer(name, None, persistent=False)
        self.register_load_state_dict_post_hook(_derive_after_load)

    @property
    def integer_output(self) -> bool:
        return self.out_scale is not None

    @property
    def wide(self) -> bool:
        """True when the integer output is int32 (read by float code or returned by the model)."""
        return self.out_range is not None and int(self.out_range[1]) > INT8_HI

    def set_output(self, out_scale: Tensor | float, wide: bool = False) -> None:
        """Switch to the integer output form at ``out_scale`` (int8, or int32 when ``wide``); needs a
        static ``act_scale``. The constants follow :func:`prunekit.quant.rounding.layer_constants`."""
        if self.act_scale is None:
            raise ValueError("an integer output needs static activations (a calibrated act_scale)")
        self.out_scale = torch.as_tensor(out_scale, dtype=torch.float32).reshape(()).clone()
        lo, hi = (INT32_LO, INT32_HI) if wide else (INT8_LO, INT8_HI)
        self.out_range = torch.tensor([lo, hi], dtype=torch.int64)
        self.derive()

    def derive(self) -> None:
        """(Re)compute ``bias_q``, ``out_mult``, ``out_shift`` from the scales and the bias."""
        bias_q, mult, shift = layer_constants(self.act_scale, self.weight_scale, self.bias, self.out_scale)
        self.bias_q, self.out_mult, self.out_shift = (
            bias_q.to(torch.int32),
            mult.to(torch.int32),
            shift.to(torch.int8),
        )
        # the same constants as int64 and the clamp as Python ints, ready for every forward
        self._int64 = (bias_q.to(torch.int64), mult.to(torch.int64), shift.to(torch.int64))
        self._range = tuple(int(v) for v in self.out_range)

    def output_skeleton(self, wide: bool) -> None:
        """The integer output form, its scale to come from a state dict (the rest is derived on load)."""
        self.out_scale = torch.ones((), dtype=torch.float32)
        lo, hi = (INT32_LO, INT32_HI) if wide else (INT8_LO, INT8_HI)
        self.out_range = torch.tensor([lo, hi], dtype=torch.int64)

    def _finish(self, acc: Tensor, s_x: Tensor, channel_dim: int) -> Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        if self.out_scale is not None:
            bias_q, mult, shift = (t.reshape(shape) for t in self._int64)
            q = requantize(acc.to(torch.int64) + bias_q, mult, shift, *self._range)
            return q.to(torch.float32) * self.out_scale
        scale = s_x * self.weight_scale  # one float32 vector product, as the kernels compute it
        y = acc.to(torch.float32) * scale.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def _mode(self) -> str:
        mode = "dynamic" if self.act_scale is None else "static"
        if self.out_scale is not None:
            mode += ", output int32" if self.wide else ", output int8"
        return mode


def _derive_after_load(module: nn.Module, incompatible) -> None:
    # a module-level function (not a closure or bound method): deep copies keep a working hook
    if module.out_scale is not None and module.act_scale is not None:
        module.derive()


class QuantizedLinear(QuantizedLayer):
    """An ``nn.Linear`` with int8 weights and int8 activations (module docstring)."""

    def __init__(
        self,
        linear: nn.Linear,
        act_scale: Tensor | None = None,
        *,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        """``weight``/``bias`` replace the layer's own (a folded BatchNorm's); ``linear`` gives the shape."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_buffers(
            linear.weight if weight is None else weight, linear.bias if bias is None else bias, act_scale
        )

    def forward(self, x: Tensor) -> Tensor:
        xq, s_x = quantize_activation(x, self.act_scale)
        acc = F.linear(xq.to(torch.float64), self.weight_q.to(torch.float64))
        return self._finish(acc, s_x, -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={self._mode()}"


class QuantizedConv2d(QuantizedLayer):
    """An ``nn.Conv2d`` (zero padding) with int8 weights and int8 activations (module docstring)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        act_scale: Tensor | None = None,
        *,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        """``weight``/``bias`` replace the layer's own (a folded BatchNorm's); ``conv`` gives the geometry."""
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantizedConv2d: padding_mode must be 'zeros', got '{conv.padding_mode}'")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_buffers(
            conv.weight if weight is None else weight, conv.bias if bias is None else bias, act_scale
        )

    def forward(self, x: Tensor) -> Tensor:
        xq, s_x = quantize_activation(x, self.act_scale)
        acc = F.conv2d(
            xq.to(torch.float64),
            self.weight_q.to(torch.float64),
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        return self._finish(acc, s_x, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, activations={self._mode()}"
        )
