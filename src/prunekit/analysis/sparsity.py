"""Parameter counts and the per-layer sparsity table, on effective (masked) weights.

INT8 layers (:mod:`prunekit.quant.layers`, recognised by their base class, not by a buffer name) hold their
weights and bias as buffers (``weight_q``, ``bias``): they count as that layer's parameters, so a quantized
model counts like its float source, except that a folded BatchNorm's two parameters per channel become the
convolution's one bias. Scales are not parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.masking import type_name
from prunekit.quant.layers import QuantizedLayer
from prunekit.spec import Spec


def effective_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the forward pass sees it (``weight`` of a masked layer includes its zeros)."""
    out = {}
    for mname, module in model.named_modules():
        if "parametrizations" in mname.split("."):
            continue  # the stored originals behind a parametrization are reported through their owner
        names = [n for n, p in module._parameters.items() if p is not None]
        if isinstance(module, QuantizedLayer):
            names += [n for n in ("weight_q", "bias") if module._buffers.get(n) is not None]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        for name in names:
            out[f"{mname}.{name}" if mname else name] = getattr(module, name).detach()
    return out


def count_params(model: nn.Module) -> dict[str, Any]:
    """Total and non-zero parameters, and the resulting overall sparsity."""
    total = nonzero = 0
    for value in effective_parameters(model).values():
        total += value.numel()
        nonzero += int(torch.count_nonzero(value))
    return {"params": total, "nonzero_params": nonzero, "sparsity": 1 - nonzero / total if total else 0.0}


def layer_table(model: nn.Module, specs: Mapping[str, Spec] | None = None) -> list[dict[str, Any]]:
    """One row per layer with a weight matrix or kernel (Linear, Conv, Embedding; not norms or biases):
    name, type, shape, params, nonzeros, sparsity, pattern."""
    specs = specs or {}
    rows = []
    for name, module in model.named_modules():
        # an int8 layer has no weight: the zeros of weight_q are its zeros
        weight = module.weight_q if isinstance(module, QuantizedLayer) else getattr(module, "weight", None)
        if "parametrizations" in name.split(".") or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        weight = weight.detach()
        nonzero = int(torch.count_nonzero(weight))
        rows.append(
            {
                "layer": name,
                "type": type_name(module),
                "shape": list(weight.shape),
                "params": weight.numel(),
                "nonzero": nonzero,
                "sparsity": 1 - nonzero / weight.numel(),
                "pattern": str(specs[name]) if name in specs else "dense",
            }
        )
    return rows
