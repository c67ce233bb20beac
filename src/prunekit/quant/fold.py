"""Fold inference-mode BatchNorm into the convolution that feeds it (before INT8 conversion).

``bn(conv(x)) = conv'(x)`` with ``W' = W * c`` and ``b' = (b - mean) * c + beta``, ``c = gamma / sqrt(var +
eps)`` per output channel. Only the running statistics are used, so this is the eval-mode model. A weight
that is zero stays exactly zero (it is multiplied by a scalar), so pruned positions survive folding.

A pair is folded only when it is provably safe: the convolution's output feeds that BatchNorm and nothing
else, each module runs once, and the BatchNorm tracks running statistics. The pairs are found with a
``torch.fx`` trace; a model that does not trace falls back to pairs that are adjacent inside an
``nn.Sequential`` (there the convolution's output can go nowhere else). Anything else stays a float
BatchNorm after the int8 convolution, with the reason returned.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class FoldedBatchNorm(nn.Identity):
    """Where a BatchNorm was: it now lives in the weights and bias of the int8 convolution ``into``."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def extra_repr(self) -> str:
        return f"folded into {self.into}"


def fold_conv_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The folded ``(weight, bias)`` of ``bn(conv(x))`` (float32; pure: nothing is modified)."""
    weight = weight.detach().to(torch.float32)
    mean = bn.running_mean.detach().to(torch.float32)
    var = bn.running_var.detach().to(torch.float32)
    gamma = bn.weight.detach().to(torch.float32) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(torch.float32) if bn.bias is not None else torch.zeros_like(mean)
    c = gamma / torch.sqrt(var + bn.eps)
    b = bias.detach().to(torch.float32) if bias is not None else torch.zeros_like(mean)
    return weight * c.reshape(-1, *([1] * (weight.dim() - 1))), (b - mean) * c + beta


def _foldable_bn(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded, or None."""
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not BatchNorm2d"
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (it normalises with each batch's own)"
    return None


def _fx_pairs(model: nn.Module) -> dict[str, str] | None:
    """conv name -> bn name from an fx trace, or None when the model does not trace."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable code; the fallback handles them all
        log.info(
            "fold: the model does not fx-trace (%s: %s); folding nn.Sequential pairs only",
            type(exc).__name__,
            exc,
        )
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        single = calls[src.target] == 1 and calls[node.target] == 1  # a shared module runs twice: unsafe
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and single:
            pairs[src.target] = node.target
    return pairs


def _sequential_pairs(model: nn.Module) -> dict[str, str]:
    pairs = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, first), (b, second) in zip(children, children[1:]):
            if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                prefix = f"{name}." if name else ""
                pairs[prefix + a] = prefix + b
    return pairs


def find_conv_bn(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """``(pairs, kept)``: conv name -> the BatchNorm it can absorb, and BatchNorm name -> why it stays."""
    found = _fx_pairs(model)
    pairs = _sequential_pairs(model) if found is None else found
    kept, out = {}, {}
    for conv, bn in pairs.items():
        reason = _foldable_bn(model.get_submodule(bn))
        if reason is None and model.get_submodule(conv).padding_mode == "zeros":
            out[conv] = bn
        else:
            kept[bn] = reason or "its convolution does not use zero padding"
    folded = set(out.values())
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name not in folded and name not in kept:
            kept[name] = "not fed by a convolution whose output goes only to it"
    return out, kept
