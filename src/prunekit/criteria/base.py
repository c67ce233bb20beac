"""The criterion interface and registry.

A criterion turns a layer's weight (and, for some, statistics gathered from data or training) into an
importance score of the same shape: higher means more important. The math of each criterion is a pure
function in its own module; the classes here only gather what that function needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from prunekit.calib.gradients import gradients_of
from prunekit.errors import PrunekitError
from prunekit.masking import weight_parameter
from prunekit.registry import CRITERIA

Batch = tuple  # (inputs, targets)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Criterion:
    """Base class. ``needs`` is ``"weights"``, ``"gradients"``, ``"activations"``, ``"training"`` (scores
    accumulate while the model trains: AGP prunes by them), or ``"gates"`` (learned masks, read once at the
    end of training: :mod:`prunekit.criteria.l0`)."""

    needs = "weights"
    default_group = "layer"

    def collect(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        batches: Iterable[Batch],
        loss_fn: LossFn | None,
    ) -> None:
        """Gather statistics from calibration batches (no-op for weight-only criteria)."""

    def start(self, layers: Mapping[str, nn.Module]) -> None:
        """Called by ``Sparsifier.prepare()`` before training starts."""

    def on_step(self, layers: Mapping[str, nn.Module]) -> None:
        """Called once after each optimizer step during training (movement pruning accumulates here)."""

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        """Importance of each weight. Must return the same values when called again before new data or
        steps arrive: selection may read a layer's scores more than once."""
        raise NotImplementedError


def make_criterion(name: str, seed: int = 0) -> Criterion:
    """Build a registered criterion by name (raises with a did-you-mean on a typo), or a factory named as
    ``package.module:attribute`` (see :mod:`prunekit.registry`)."""
    return CRITERIA.get(name)(seed=seed)


def effective_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def gradient_passes(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: LossFn | None,
    visit: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> int:
    """Run forward/backward on each batch and call ``visit(name, weight, grad)`` for every layer.

    Gradients the model had before are restored afterwards, so a user's training state is untouched.
    """
    if loss_fn is None:
        raise PrunekitError("this criterion needs a loss function to compute gradients")
    params = {name: weight_parameter(m) for name, m in layers.items()}
    n = 0
    with gradients_of(model, params):
        for inputs, targets in batches:
            loss = loss_fn(model(inputs), targets)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, module), grad in zip(layers.items(), grads):
                if grad is not None:
                    visit(name, effective_weight(module), grad.detach())
            n += 1
    if n == 0:
        raise PrunekitError("no calibration batch was given")
    return n
