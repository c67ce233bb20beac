"""Built-in model architectures, by name (used by recipes and to reload artifacts)."""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.resnet import ResNet18, SmallResNet
from prunekit.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model")
MODELS.register("resnet-digits")(SmallResNet)
MODELS.register("resnet18")(ResNet18)


def build_model(name: str, args: dict[str, Any] | None = None) -> nn.Module:
    cls = MODELS.get(name)
    try:
        return cls(**(args or {}))
    except TypeError as exc:
        raise PrunekitError(f"model '{name}': bad arguments {sorted(args or {})}: {exc}") from None


__all__ = ["MODELS", "build_model", "ResNet18", "SmallResNet"]
