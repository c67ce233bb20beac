"""INT8 after pruning: the arithmetic every int8 layer in prunekit follows.

Weights: per-output-channel symmetric int8, ``q = round(w / s_w)`` in [-127, 127] with
``s_w = max|w_row| / 127`` (:func:`prunekit.quant.rounding.quantize_int8`), so pruned zeros stay exactly
zero. Activations: per-tensor symmetric int8, ``x_q = clamp(round(x / s_x), -127, 127)``, with ``s_x``
either calibrated (static) or ``max|x| / 127`` of each call (dynamic; 1 when ``x`` is all zero), both by
:func:`prunekit.quant.rounding.activation_scale`.

Output: ``y = float32(acc) * (s_x * s_w) + bias`` where ``acc`` is the exact integer dot product of
``x_q`` and ``q`` (int32 in a kernel; computed here in float64, exact far beyond any layer's size), and
``s_x * s_w`` is one float32 vector product. The CPU runtime's int8 kernels reproduce this bit for bit.

Converting a model: :func:`prunekit.quant.ptq.quantize_model` (BatchNorm folding :mod:`prunekit.quant.fold`,
quantization-aware fine-tuning :mod:`prunekit.quant.qat`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.quant.rounding import quantize_activation, quantize_int8


class QuantizedLayer(nn.Module):
    """Shared buffers: ``weight_q`` (int8), ``weight_scale`` (float32, one per output channel),
    ``act_scale`` (float32 scalar, or None for dynamic activations), ``bias`` (float32 or None)."""

    def _init_buffers(self, weight: Tensor, bias: Tensor | None, act_scale: Tensor | None) -> None:
        q, scale = quantize_int8(weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.register_buffer("act_scale", None if act_scale is None else act_scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def _finish(self, acc: Tensor, s_x: Tensor, channel_dim: int) -> Tensor:
        scale = s_x * self.weight_scale  # one float32 vector product, as the kernels compute it
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        y = acc.to(torch.float32) * scale.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


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
        mode = "dynamic" if self.act_scale is None else "static"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={mode}"


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
        mode = "dynamic" if self.act_scale is None else "static"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, activations={mode}"
        )
