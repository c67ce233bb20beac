"""Movement pruning: S = -sum_t w_t * dL/dw_t accumulated over fine-tuning steps; weights moving toward
zero get low scores (Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning",
NeurIPS 2020).

One deliberate difference from the paper: here masks only grow. The paper passes the gradient straight
through the mask, so a pruned weight's score keeps moving and the weight can come back at a later pruning
step. prunekit's masks are a parametrization ``where(mask, w, 0)``: a pruned weight and its gradient are
exactly zero, so its score freezes at the value it had when it was pruned, and every selection keeps
pruned weights pruned (as it does for every criterion under AGP). What is pruned stays pruned, and what
is kept is ranked by movement as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prunekit.criteria.base import CRITERIA, Criterion, effective_weight
from prunekit.errors import PrunekitError
from prunekit.masking import weight_parameter


def movement_update(score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One step of the accumulation: S <- S - w * g."""
    return score - weight.detach() * grad.detach()


@CRITERIA.register("movement")
class Movement(Criterion):
    needs = "training"

    def __init__(self, seed: int = 0) -> None:
        self._score: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}  # w_t: the weights the step's gradient was taken at
        self.steps = 0

    def start(self, layers: Mapping[str, nn.Module]) -> None:
        for name, module in layers.items():
            self._before[name] = effective_weight(module).clone()

    def on_step(self, layers: Mapping[str, nn.Module]) -> None:
        # on_step runs after optimizer.step(): the gradient g_t belongs to the weights before the step,
        # so pair it with the copy kept from the previous call (one extra copy of the pruned layers)
        for name, module in layers.items():
            weight = effective_weight(module)
            grad = weight_parameter(module).grad
            if grad is not None:
                before = self._before.get(name, weight)
                prev = self._score.get(name, torch.zeros_like(weight, dtype=torch.float32))
                self._score[name] = movement_update(prev, before, grad)
            self._before[name] = weight.clone()
        self.steps += 1

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        if name not in self._score:
            raise PrunekitError(
                "movement scores accumulate during training: call sparsifier.step() after "
                "each optimizer step before pruning"
            )
        return self._score[name]
