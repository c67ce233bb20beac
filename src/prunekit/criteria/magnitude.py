"""Magnitude pruning: importance = |w| (Han, Pool, Tran & Dally, "Learning both Weights and Connections
for Efficient Neural Networks", NeurIPS 2015)."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.criteria.base import CRITERIA, Criterion, effective_weight


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|w|, element-wise."""
    return weight.detach().abs()


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        return magnitude_scores(effective_weight(module))
