"""Optimal Brain Damage saliency: s = 1/2 * w^2 * diag(H) (LeCun, Denker & Solla, "Optimal Brain Damage",
NeurIPS 1989), with the empirical Fisher standing in for the Hessian diagonal (as in e.g. Theis et al.,
"Faster gaze prediction with dense networks and Fisher pruning", 2018).

Two criteria:

- ``obd``: the empirical Fisher as defined, F = (1/N) sum_i g_i^2 over the N calibration *samples*, each
  g_i the gradient of that one sample's loss (one backward pass per sample);
- ``obd-batch``: (1/B) sum_b g_b^2 over mini-batch gradients g_b (one backward pass per batch). Cheaper,
  but not the empirical Fisher: a batch gradient averages its samples' gradients, so their disagreement
  (the part of F that is variance) shrinks with the batch size. With batches of one sample it equals
  ``obd``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from prunekit.calib.stats import RunningMean
from prunekit.criteria.base import CRITERIA, Batch, Criterion, LossFn, effective_weight, gradient_passes
from prunekit.errors import PrunekitError


def obd_scores(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """1/2 * w^2 * h, element-wise."""
    return 0.5 * weight.detach().pow(2) * hessian_diag


def single_samples(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Every sample of every ``(inputs, targets)`` batch as a batch of one (leading dimension kept)."""
    for inputs, targets in batches:
        for i in range(len(inputs)):
            yield inputs[i : i + 1], targets[i : i + 1]


@CRITERIA.register("obd")
class OBD(Criterion):
    """OBD with the per-sample empirical Fisher."""

    needs = "gradients"
    per_sample = True

    def __init__(self, seed: int = 0) -> None:
        self._fisher: dict[str, RunningMean] = {}

    def collect(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        batches: Iterable[Batch],
        loss_fn: LossFn | None,
    ) -> None:
        self._fisher = {name: RunningMean() for name in layers}
        passes = single_samples(batches) if self.per_sample else batches
        gradient_passes(
            model, layers, passes, loss_fn, lambda name, w, g: self._fisher[name].add_batch(g.pow(2))
        )

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        if name not in self._fisher:
            raise PrunekitError("the obd criterion needs calibration batches (collect) before scoring")
        return obd_scores(effective_weight(module), self._fisher[name].value())


@CRITERIA.register("obd-batch")
class OBDBatch(OBD):
    """OBD with squared mini-batch gradients (cheaper; not the empirical Fisher, see the module docs)."""

    per_sample = False
