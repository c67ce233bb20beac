"""Optimal Brain Damage saliency: s = 1/2 * w^2 * diag(H) (LeCun, Denker & Solla, "Optimal Brain Damage",
NeurIPS 1989), with the empirical Fisher E[g^2] standing in for the Hessian diagonal (as in e.g. Theis et
al., "Faster gaze prediction with dense networks and Fisher pruning", 2018).

The Fisher is estimated from mini-batch gradients: use small calibration batches for a closer estimate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunekit.calib.stats import RunningMean
from prunekit.criteria.base import CRITERIA, Batch, Criterion, LossFn, effective_weight, gradient_passes
from prunekit.errors import PrunekitError


def obd_scores(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """1/2 * w^2 * h, element-wise."""
    return 0.5 * weight.detach().pow(2) * hessian_diag


@CRITERIA.register("obd")
class OBD(Criterion):
    needs = "gradients"

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
        gradient_passes(
            model, layers, batches, loss_fn, lambda name, w, g: self._fisher[name].add_batch(g.pow(2))
        )

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        if name not in self._fisher:
            raise PrunekitError("the obd criterion needs calibration batches (collect) before scoring")
        return obd_scores(effective_weight(module), self._fisher[name].value())
