"""Multiply-accumulate count of one forward pass, measured with forward hooks.

    info = count_macs(model, torch.randn(1, 3, 224, 224))
    info["total"]      # MACs of the whole pass (batch included)
    info["layers"]     # one row per counted module: name, type, calls, macs, output shape

What is counted (one MAC = one multiply plus one add; biases are not counted):

- ``Conv1d/2d/3d``: ``output.numel() * in_channels / groups * prod(kernel_size)`` -- every output element is a
  dot product over one group's input channels and the kernel window; stride, padding and dilation only
  change the output size, so they enter through ``output.numel()``. Depthwise convs are the case
  ``groups == in_channels``.
- ``ConvTranspose1d/2d/3d``: ``input.numel() * out_channels / groups * prod(kernel_size)`` -- every input
  element is scattered into one group's output channels over the kernel window (output padding and cropped
  borders are counted as computed, which is what the kernels do).
- ``Linear``: ``output.numel() * in_features``, for any number of leading dimensions.
- ``MultiheadAttention``: the q/k/v input projections (``L_q*E*E + L_k*kdim*E + L_k*vdim*E``), the two
  attention matmuls ``Q K^T`` and ``softmax(.) V`` (``L_q*L_k*E`` each, summed over heads), and the output
  projection (``L_q*E*E``), times the batch size; ``add_bias_kv`` and ``add_zero_attn`` lengthen ``L_k``.
  Its ``out_proj`` child is never counted on its own (the functional path uses its weight directly).

What is not counted: normalisation layers, activations, pooling, softmax, residual adds and other
elementwise work (all linear in the activation size and small next to the matmuls), embeddings (lookups),
recurrent layers, and anything computed with functional calls (``F.conv2d``, ``torch.matmul``) outside the
module types above. Leaf modules that hold parameters but are of none of the counted or known-cheap types
(e.g. ``nn.LSTM``, ``nn.Bilinear``, custom layers) are listed under ``"uncounted"`` so the gap is visible.

The model runs once under ``torch.no_grad`` in eval mode (so BatchNorm statistics do not move); every
module's training flag is restored and every hook removed afterwards, also when the forward pass fails.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# parameterised modules whose work is elementwise or a lookup: zero MACs by design, not a gap
_CHEAP = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.PReLU,
    nn.Embedding,
    nn.EmbeddingBag,
)
_RMS_NORM = getattr(nn, "RMSNorm", None)
if _RMS_NORM is not None:
    _CHEAP = (*_CHEAP, _RMS_NORM)


def _conv_macs(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _conv_t_macs(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return inputs[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)


def _linear_macs(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * m.in_features


def _mha_macs(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int:
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(names))
    if q.dim() == 2:  # unbatched: (L, E)
        batch, lq, lk = 1, q.shape[0], k.shape[0]
    elif m.batch_first:  # (N, L, E)
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    else:  # (L, N, E)
        batch, lq, lk = q.shape[1], q.shape[0], k.shape[0]
    e = m.embed_dim
    projections = lq * e * e + lk * m.kdim * e + lk * m.vdim * e
    lk += int(m.bias_k is not None) + int(m.add_zero_attn)
    attention = 2 * lq * lk * e  # Q K^T and A V, head_dim * num_heads == embed_dim
    out = lq * e * e
    return batch * (projections + attention + out)


def _shape(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return tuple(x[0].shape)
    return None


def count_macs(model: nn.Module, example_inputs: torch.Tensor | tuple) -> dict[str, Any]:
    """Count the multiply-accumulates of one forward pass of ``model`` on ``example_inputs``.

    ``example_inputs``: a tensor or a tuple of positional arguments. Returns a dict with ``total`` (int),
    ``layers`` (list of rows ``{"name", "type", "calls", "macs", "output_shape"}`` in first-call order; a
    module called several times is one row with its MACs summed), ``by_type`` (type name -> MACs) and
    ``uncounted`` (names of parameterised leaf modules that ran but whose MACs this function cannot count).
    See the module docstring for what is and is not counted.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    rows: dict[str, dict[str, Any]] = {}
    uncounted: list[str] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def record(name: str, module: nn.Module, macs: int, output: Any) -> None:
        row = rows.get(name)
        if row is None:
            row = rows[name] = {
                "name": name,
                "type": type(module).__name__,
                "calls": 0,
                "macs": 0,
                "output_shape": _shape(output),
            }
        row["calls"] += 1
        row["macs"] += int(macs)

    def plain_hook(name: str, fn):
        def hook(module, inputs, output):
            record(name, module, fn(module, inputs, output), output)

        return hook

    def mha_hook(name: str):
        def hook(module, args, kwargs, output):
            record(name, module, _mha_macs(module, args, kwargs), output)

        return hook

    def flag_hook(name: str):
        def hook(module, inputs, output):
            if name not in uncounted:
                uncounted.append(name)

        return hook

    inside_mha = {
        id(sub)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
        for sub in m.modules()
        if sub is not m
    }
    training = {m: m.training for m in model.modules()}
    try:
        for name, m in model.named_modules():
            label = name or "<model>"
            if id(m) in inside_mha:
                continue
            if isinstance(m, nn.MultiheadAttention):
                handles.append(m.register_forward_hook(mha_hook(label), with_kwargs=True))
            elif isinstance(m, _CONV_T):
                handles.append(m.register_forward_hook(plain_hook(label, _conv_t_macs)))
            elif isinstance(m, _CONV):
                handles.append(m.register_forward_hook(plain_hook(label, _conv_macs)))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(plain_hook(label, _linear_macs)))
            elif (
                not isinstance(m, _CHEAP)
                and next(m.children(), None) is None
                and next(m.parameters(recurse=False), None) is not None
            ):
                handles.append(m.register_forward_hook(flag_hook(label)))
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    layers = list(rows.values())
    by_type: dict[str, int] = defaultdict(int)
    for row in layers:
        by_type[row["type"]] += row["macs"]
    return {
        "total": sum(row["macs"] for row in layers),
        "layers": layers,
        "by_type": dict(by_type),
        "uncounted": uncounted,
    }
