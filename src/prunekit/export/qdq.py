"""The QDQ twin of an INT8 prunekit model: the same model with each int8 module replaced by float
arithmetic between ``QuantizeLinear`` / ``DequantizeLinear`` pairs (torch's ``quantized_decomposed`` ops,
which ``torch.onnx.export`` writes as those ONNX operators), so that onnxruntime sees a standard static
QDQ model (per-channel int8 weights, int32 biases on the accumulator's grid, per-tensor int8 activations,
zero points 0) and runs it on its integer kernels (``QLinearConv``, ``QLinearMatMul``, ``QLinearAdd``...).

Every scale is the prunekit model's own (:mod:`prunekit.quant.graph`), so the integers onnxruntime
computes are prunekit's, except where onnxruntime rounds differently: it requantizes with a float32
multiplier and rounds half to even, prunekit with a 31-bit fixed-point one (:mod:`prunekit.quant.rounding`);
the two agree except when a value lies within about 2**-24 of a rounding tie, and then by one step. ONNX
int8 also reaches -128 where prunekit clamps at -127 (a value below the calibrated range). docs/onnx.md.
"""

from __future__ import annotations

import copy

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.quant.glue import (
    QuantizedAdd,
    QuantizedAvgPool2d,
    QuantizedClamp,
    QuantizedGlobalAvgPool,
    QuantizedHardswish,
    QuantizeInput,
)
from prunekit.quant.layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear

_QD = torch.ops.quantized_decomposed
_I32 = (-(2**31), 2**31 - 1)


def qdq(x: Tensor, scale: float) -> Tensor:
    """``DequantizeLinear(QuantizeLinear(x, scale, 0))`` with int8 (ONNX rounds half to even, as prunekit)."""
    q = _QD.quantize_per_tensor(x, scale, 0, -128, 127, torch.int8)
    return _QD.dequantize_per_tensor(q, scale, 0, -128, 127, torch.int8)


class QDQLayer(nn.Module):
    """An int8 Linear/Conv2d as ``Q/DQ(input) -> Conv|Gemm(DQ(weight), DQ(bias)) [-> Q/DQ(output)]``."""

    def __init__(self, m: QuantizedLayer) -> None:
        super().__init__()
        if m.act_scale is None:
            raise PrunekitError(
                "ONNX QDQ export needs static (calibrated) activations; this int8 model quantizes each "
                "input on the fly (activations: dynamic): quantize with activations='static'"
            )
        self.conv = isinstance(m, QuantizedConv2d)
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        self.s_x = float(m.act_scale)
        n = m.weight_q.shape[0]
        self.register_buffer("weight_q", m.weight_q.clone())
        self.register_buffer("weight_scale", m.weight_scale.clone())
        self.register_buffer("zero", torch.zeros(n, dtype=torch.int64))
        prod = m.act_scale.to(torch.float32) * m.weight_scale  # one float32 product, as prunekit's
        self.register_buffer("prod", prod)
        if m.integer_output:
            self.register_buffer("bias_q", m.bias_q.to(torch.int32).clone())
            self.float_bias = None
        else:  # float output: the float bias, added after the dequantized accumulator
            self.bias_q = None
            self.float_bias = None if m.bias is None else nn.Parameter(m.bias.clone(), requires_grad=False)
        self.s_out = float(m.out_scale) if m.integer_output and not m.wide else None

    def forward(self, x: Tensor) -> Tensor:
        x = qdq(x, self.s_x)
        w = _QD.dequantize_per_channel(self.weight_q, self.weight_scale, self.zero, 0, -127, 127, torch.int8)
        if self.bias_q is not None:
            b = _QD.dequantize_per_channel(self.bias_q, self.prod, self.zero, 0, *_I32, torch.int32)
        else:
            b = self.float_bias
        if self.conv:
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.linear(x, w, b)
        return y if self.s_out is None else qdq(y, self.s_out)


class QDQInput(nn.Module):
    def __init__(self, m: QuantizeInput) -> None:
        super().__init__()
        self.s = float(m.scale)

    def forward(self, x: Tensor) -> Tensor:
        return qdq(x, self.s)


class QDQAdd(nn.Module):
    def __init__(self, m: QuantizedAdd) -> None:
        super().__init__()
        self.s = float(m.scale_out)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return qdq(a + b, self.s)


class QDQAvgPool(nn.Module):
    def __init__(self, m: QuantizedAvgPool2d) -> None:
        super().__init__()
        self.k, self.st, self.p, self.s = m.kernel_size, m.stride, m.padding, float(m.scale_out)

    def forward(self, x: Tensor) -> Tensor:
        return qdq(F.avg_pool2d(x, self.k, self.st, self.p, False, True), self.s)


class QDQGlobalPool(nn.Module):
    def __init__(self, m: QuantizedGlobalAvgPool) -> None:
        super().__init__()
        self.keepdim, self.s = m.keepdim, float(m.scale_out)

    def forward(self, x: Tensor) -> Tensor:
        y = qdq(F.adaptive_avg_pool2d(x, 1), self.s)  # GlobalAveragePool: onnxruntime's QLinear form
        return y if self.keepdim else y.flatten(1)


class QDQClamp(nn.Module):
    def __init__(self, m: QuantizedClamp) -> None:
        super().__init__()
        self.s, self.top = float(m.scale), m.hi * float(m.scale)

    def forward(self, x: Tensor) -> Tensor:
        return qdq(torch.clamp(x, 0.0, self.top), self.s)


class QDQHardswish(nn.Module):
    def __init__(self, m: QuantizedHardswish) -> None:
        super().__init__()
        self.s = float(m.scale_out)

    def forward(self, x: Tensor) -> Tensor:
        return qdq(F.hardswish(x), self.s)


TWINS = {
    QuantizedLinear: QDQLayer,
    QuantizedConv2d: QDQLayer,
    QuantizeInput: QDQInput,
    QuantizedAdd: QDQAdd,
    QuantizedAvgPool2d: QDQAvgPool,
    QuantizedGlobalAvgPool: QDQGlobalPool,
    QuantizedClamp: QDQClamp,
    QuantizedHardswish: QDQHardswish,
}


def is_int8(model: nn.Module) -> bool:
    return any(type(m) in TWINS for m in model.modules())


def qdq_twin(model: nn.Module) -> nn.Module:
    """A copy of the int8 ``model`` with every int8 module replaced by its QDQ twin (the model itself
    is not changed)."""
    twin = copy.deepcopy(model).eval()
    for name, m in list(twin.named_modules()):
        make = TWINS.get(type(m))
        if make is not None and name:
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, make(m))
    return twin
