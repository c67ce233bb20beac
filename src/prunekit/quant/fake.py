"""Fake quantization: the modules quantization-aware training adds to a model, and how to take them out.

:class:`FakeQuantWeight` (a weight parametrization) and :class:`InputFakeQuant` (an input pre-hook module)
compute in float what the int8 layer computes, with gradients passed straight through
(:mod:`prunekit.quant.qat` adds them; :func:`strip_qat` is what post-training conversion calls on a copy).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.quant.rounding import dequantize, quantize_activation, quantize_int8


class FakeQuantWeight(nn.Module):
    """Parametrization ``w -> q * s`` (per-output-channel int8, :func:`quantize_int8`), gradient passed
    straight through. ``enabled=False`` makes it the identity (conversion reads the float weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        q, scale = quantize_int8(weight)
        fake = dequantize(q, scale, weight.dtype)
        return weight + (fake - weight).detach()


class InputFakeQuant(nn.Module):
    """``x -> x_q * s_x`` as :func:`prunekit.quant.rounding.quantize_activation` rounds it, gradient passed
    straight through. ``scale`` is a fixed buffer (static) or None (dynamic: per call)."""

    def __init__(self, scale: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("scale", None if scale is None else scale.detach().to(torch.float32).reshape(()))

    def forward(self, x: Tensor) -> Tensor:
        xq, s = quantize_activation(x.detach(), self.scale)
        fake = (xq.to(torch.float32) * s).to(x.dtype)
        return x + (fake - x).detach()

    def extra_repr(self) -> str:
        return "dynamic" if self.scale is None else f"scale={float(self.scale):.6g}"


def quantize_input(module: nn.Module, args: tuple) -> tuple:
    # a module-level function, not a closure: deep copies of the model keep a working hook, and
    # strip_qat can find it by identity
    return (module.input_quant(args[0]), *args[1:])


def strip_qat(model: nn.Module) -> dict[str, Tensor | None]:
    """Remove input fake-quant and disable weight fake-quant, in place; returns each layer's input scale
    (None: dynamic). The weight parametrizations stay (``plain_copy`` writes them in)."""
    scales: dict[str, Tensor | None] = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "input_quant", None), InputFakeQuant):
            scales[name] = module.input_quant.scale
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is quantize_input]:
                del module._forward_pre_hooks[key]
            del module.input_quant
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, FakeQuantWeight):
                    p.enabled = False
    return scales


def fake_quantized(model: nn.Module) -> list[str]:
    """The layers of ``model`` with active fake quantization (input hooks, or enabled weight fake-quant);
    empty for a model never prepared or after :func:`strip_qat`."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "input_quant", None), InputFakeQuant)
        or (
            parametrize.is_parametrized(module, "weight")
            and any(isinstance(p, FakeQuantWeight) and p.enabled for p in module.parametrizations.weight)
        )
    ]
