"""Built-in model architectures, by name (used by recipes and to reload artifacts)."""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.resnet import ResNet18, SmallResNet
from prunekit.models.sources import is_source_name, rebuild
from prunekit.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model")
MODELS.register("resnet-digits")(SmallResNet)
MODELS.register("resnet18")(ResNet18)


def build_model(name: str, args: dict[str, Any] | None = None, allow_code: bool = False) -> nn.Module:
    """A fresh model: a built-in architecture by name, or one a model source recorded (``@torchvision:``,
    ``@hf:``, ``@factory:`` names, prunekit.models.sources; ``@factory:`` only with ``allow_code``)."""
    if is_source_name(name):
        return rebuild({"name": name, "args": args}, allow_code=allow_code)
    cls = MODELS.get(name)
    try:
        return cls(**(args or {}))
    except TypeError as exc:
        raise PrunekitError(f"model '{name}': bad arguments {sorted(args or {})}: {exc}") from None


__all__ = ["MODELS", "build_model", "ResNet18", "SmallResNet"]
