"""First-order Taylor importance: |w * dL/dw|, the estimated change of the loss when w is set to zero
(Molchanov, Tyree, Karras, Aila & Kautz, "Pruning Convolutional Neural Networks for Resource Efficient
Inference", ICLR 2017; Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019).

The score is averaged over calibration batches as mean_b |w * g_b|: averaging the gradient first would
cancel to ~0 on a converged model and rank by noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunekit.calib.stats import RunningMean
from prunekit.criteria.base import CRITERIA, Batch, Criterion, LossFn, gradient_passes
from prunekit.errors import PrunekitError


def taylor_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|w * g| for one batch's gradient g."""
    return (weight.detach() * grad.detach()).abs()


@CRITERIA.register("taylor")
class Taylor(Criterion):
    needs = "gradients"

    def __init__(self, seed: int = 0) -> None:
        self._acc: dict[str, RunningMean] = {}

    def collect(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        batches: Iterable[Batch],
        loss_fn: LossFn | None,
    ) -> None:
        self._acc = {name: RunningMean() for name in layers}
        gradient_passes(
            model, layers, batches, loss_fn, lambda name, w, g: self._acc[name].add_batch(taylor_scores(w, g))
        )

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        if name not in self._acc:
            raise PrunekitError("the taylor criterion needs calibration batches (collect) before scoring")
        return self._acc[name].value()
