"""Physically remove units: slice every coupled parameter, then fix the module attributes that record
sizes (``in_channels``, ``num_features``, ...). The same plan, as JSON, replays on a fresh model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.structured.graph import Group
from prunekit.structured.mha import disable_fused_paths, fix_multihead_attention

Plan = dict[str, dict[str, list[int]]]  # parameter name -> {dim (as a string): [removed indices]}


def plan_removal(groups: list[Group], removed_units: Mapping[int, torch.Tensor]) -> dict:
    """Turn removed units per group into removed indices per parameter (union across groups)."""
    per_param: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for group in groups:
        units = removed_units.get(group.index)
        if units is None or units.numel() == 0:
            continue
        table = torch.zeros(group.units + 1, dtype=torch.bool)  # unit -> removed; the last slot is owner -1
        table[units] = True
        for member in group.members:
            drop = table[member.line()].nonzero().reshape(-1).tolist()
            if drop:
                per_param[member.name][member.dim] |= set(drop)
    return {
        name: {str(d): sorted(idx) for d, idx in sorted(dims.items())}
        for name, dims in sorted(per_param.items())
    }


def _owner_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each parameter/buffer object: a shared weight has several."""
    holders: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                holders[id(tensor)].append((module, attr))
    return holders


def apply_plan(model: nn.Module, plan: Mapping[str, Mapping], steer: bool = True) -> Callable[[], None]:
    """Slice the parameters/buffers named in ``plan`` in place (in every module that shares them) and fix
    the affected modules' attributes. Returns ``undo()``, which restores the model exactly.

    ``steer``: also keep PyTorch's fused transformer kernels away from head-pruned attention
    (:func:`~prunekit.structured.mha.disable_fused_paths`); the pruner defers this until its re-trace of
    the pruned model is done, so that the trace compares like with like."""
    holders = _aliases(model)
    saved: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    touched: dict[int, nn.Module] = {}
    for name, dims in plan.items():
        module, attr = _owner_and_attr(model, name)
        tensor = getattr(module, attr)
        sliced = tensor.detach()
        for dim, remove in dims.items():
            dim = int(dim)
            keep = torch.ones(sliced.shape[dim], dtype=torch.bool)
            keep[torch.tensor(remove, dtype=torch.long)] = False
            if not bool(keep.any()):
                raise PrunekitError(f"the plan removes every unit of {name} along dimension {dim}")
            sliced = sliced.index_select(dim, keep.nonzero().reshape(-1).to(tensor.device))
        new = sliced if dims else sliced.clone()  # index_select already copied
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new, tensor.requires_grad)
        for holder, holder_attr in holders.get(id(tensor), [(module, attr)]):
            kind = "_parameters" if isinstance(tensor, nn.Parameter) else "_buffers"
            saved.append((holder, kind, holder_attr, tensor))
            getattr(holder, kind)[holder_attr] = new
            touched[id(holder)] = holder
    attributes = {
        k: {a: v for a, v in m.__dict__.items() if not a.startswith("_")} for k, m in touched.items()
    }
    classes = {k: type(m) for k, m in touched.items()}  # a fixer may change it (MultiheadAttention)
    for module in touched.values():
        fix = _FIXERS.get(type(module)) or _NAMED_FIXERS.get(type(module).__name__)
        if fix is None:
            for cls, fixer in _FIXERS.items():
                if isinstance(module, cls):
                    fix = fixer
                    break
        if fix is not None:
            fix(module)
    steering = disable_fused_paths(model) if steer else []

    def undo() -> None:
        for module, attr, value in reversed(steering):
            setattr(module, attr, value)
        for holder, kind, attr, tensor in reversed(saved):
            getattr(holder, kind)[attr] = tensor
        for key, module in touched.items():
            module.__dict__.update(attributes[key])
            module.__class__ = classes[key]

    return undo


def _fix_conv(m: nn.modules.conv._ConvNd) -> None:
    """Sizes from the sliced weight. A depthwise conv (one input channel per group) lost whole groups, so
    its group count follows its channels; any other grouped conv was pruned in lockstep and keeps it."""
    w = m.weight
    if m.groups > 1 and m.in_channels == m.groups:
        if m.transposed:  # weight (in, out / groups, ...)
            m.groups = m.in_channels = w.shape[0]
            m.out_channels = w.shape[1] * m.groups
        else:  # weight (out, 1, ...), out / groups outputs per input channel
            m.groups = m.in_channels = w.shape[0] // (m.out_channels // m.groups)
            m.out_channels = w.shape[0]
    elif m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_batchnorm(m: nn.modules.batchnorm._NormBase) -> None:
    tensor = m.weight if m.weight is not None else m.running_mean
    if tensor is not None:
        m.num_features = tensor.shape[0]


def _fix_layernorm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_groupnorm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        if m.num_groups > 1:  # whole groups went: each group keeps its channel count
            m.num_groups = m.weight.shape[0] // (m.num_channels // m.num_groups)
        m.num_channels = m.weight.shape[0]


def _fix_rmsnorm(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _fix_prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.shape[0]


_FIXERS: dict[type, Callable[[nn.Module], None]] = {
    nn.modules.conv._ConvNd: _fix_conv,
    nn.Linear: _fix_linear,
    nn.modules.batchnorm._NormBase: _fix_batchnorm,
    nn.LayerNorm: _fix_layernorm,
    nn.GroupNorm: _fix_groupnorm,
    nn.RMSNorm: _fix_rmsnorm,
    nn.Embedding: _fix_embedding,
    nn.PReLU: _fix_prelu,
    nn.MultiheadAttention: fix_multihead_attention,
}


def _fix_hf_conv1d(m: nn.Module) -> None:
    m.nf = m.weight.shape[1]  # transformers.pytorch_utils.Conv1D: weight (in, out), output width nf


def _fix_torchvision_vit(m: nn.Module) -> None:
    # torchvision.models.VisionTransformer reshapes its patch embedding with the hidden width it stores
    if isinstance(getattr(m, "conv_proj", None), nn.Conv2d) and hasattr(m, "hidden_dim"):
        m.hidden_dim = m.conv_proj.weight.shape[0]


# by class name, for libraries prunekit does not import (no hard dependency on transformers, torchvision)
_NAMED_FIXERS: dict[str, Callable[[nn.Module], None]] = {
    "Conv1D": _fix_hf_conv1d,
    "VisionTransformer": _fix_torchvision_vit,
}


def register_module_fixer(cls: type, fixer: Callable[[nn.Module], None]) -> None:
    """Teach prunekit which attributes of a custom module record sizes after its parameters are sliced."""
    _FIXERS[cls] = fixer


def zero_plan(model: nn.Module, plan: Mapping[str, Mapping]) -> nn.Module:
    """The masked reference: zero (instead of remove) every planned slice, in place."""
    with torch.no_grad():
        for name, dims in plan.items():
            module, attr = _owner_and_attr(model, name)
            if attr == "running_var":
                continue  # keep the variance positive: gamma = beta = 0 already zeroes the channel
            tensor = getattr(module, attr)
            for dim, remove in dims.items():
                index = torch.tensor(remove, dtype=torch.long, device=tensor.device)
                tensor.index_fill_(int(dim), index, 0.0)
    return model
