"""Masks as torch parametrizations.

A masked module keeps its ``weight`` attribute: ``module.weight`` is computed as
``where(mask, original, 0)``, so pruned entries are exactly zero in every forward pass, receive zero
gradient, and stay zero whatever the optimizer does to the stored original (momentum, Adam moments,
weight decay). ``squash`` writes the zeros into a plain parameter and removes the parametrization.

Masks are keyed by module name (``"layer1.0.conv1"``) and always mask that module's ``weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError

_MASK_KEY = ".parametrizations.weight.0.mask"


class WeightMask(nn.Module):
    """Parametrization ``w -> where(mask, w, 0)``; the mask is a bool buffer saved in state dicts."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def mask_of(module: nn.Module) -> WeightMask | None:
    """The module's WeightMask parametrization, if it has one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, WeightMask):
            return p
    return None


def type_name(module: nn.Module) -> str:
    """The module's class name, seeing through the ``Parametrized*`` class that parametrize swaps in."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def weight_parameter(module: nn.Module) -> nn.Parameter:
    """The trainable tensor behind ``module.weight`` (the original when parametrized)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise PrunekitError(f"the model has no module named '{name}'") from None
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise PrunekitError(f"module '{name}' ({type(module).__name__}) has no weight tensor to mask")
    return module


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Attach or update masks. Updating copies into the existing buffer, so optimizers keep working."""
    for name, mask in masks.items():
        module = _module(model, name)
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise PrunekitError(
                f"mask for '{name}' has shape {tuple(mask.shape)}, weight has {tuple(module.weight.shape)}"
            )
        mask = mask.to(device=module.weight.device, dtype=torch.bool)
        existing = mask_of(module)
        if existing is None:
            parametrize.register_parametrization(module, "weight", WeightMask(mask), unsafe=True)
        else:
            existing.mask.copy_(mask)
        with torch.no_grad():  # keep the stored original clean too, so squash and rewinding see zeros
            weight_parameter(module).masked_fill_(~mask, 0.0)


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All masks in the model, keyed by module name."""
    return {
        name: m.mask.clone() for name, module in model.named_modules() if (m := mask_of(module)) is not None
    }


def own_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of its ``Parametrized*`` class.

    ``copy.deepcopy`` shares that injected class between a model and its copy, and
    ``remove_parametrizations`` deletes the ``weight`` property from it: squashing a copy would leave the
    original without a ``weight``. A private class keeps the other copies intact.
    """
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def squash(model: nn.Module) -> nn.Module:
    """Make the zeros permanent and remove the mask parametrizations; returns the model."""
    for _, module in list(model.named_modules()):
        if mask_of(module) is not None:
            own_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def load_masked_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load a state dict saved from a masked model into a fresh (unmasked) copy of its architecture."""
    masks = {key[: -len(_MASK_KEY)]: value for key, value in state.items() if key.endswith(_MASK_KEY)}
    apply_masks(model, {name: torch.ones_like(m, dtype=torch.bool) for name, m in masks.items()})
    model.load_state_dict(dict(state), strict=strict)
