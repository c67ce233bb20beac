"""Activation-weighted magnitude, Wanda: S_ij = |W_ij| * ||X_j||_2, compared within each output row
(Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024).

||X_j||_2 is the norm of input feature j over every calibration token (Linear) or over every batch and
spatial position of input channel j (Conv; each kernel tap of that channel shares it). The running mean
of x_j^2 is kept instead of the sum: a common factor that does not change any ranking.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunekit.calib.hooks import Hooks
from prunekit.calib.stats import RunningSqNorm
from prunekit.criteria.base import CRITERIA, Batch, Criterion, LossFn, effective_weight
from prunekit.errors import PrunekitError
from prunekit.masking import type_name


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||, with ``input_norm`` broadcastable to ``weight`` along the input dimension."""
    return weight.detach().abs() * input_norm


def conv_input_norm(weight_shape: torch.Size, groups: int, channel_norm: torch.Tensor) -> torch.Tensor:
    """Per-(output row, input column) norms for a (possibly grouped) conv weight ``(out, in/groups, *k)``."""
    out, per_group = weight_shape[0], weight_shape[1]
    norms = channel_norm.reshape(groups, per_group).repeat_interleave(out // groups, dim=0)
    return norms.reshape(out, per_group, *([1] * (len(weight_shape) - 2)))


@CRITERIA.register("wanda")
class Wanda(Criterion):
    needs = "activations"
    default_group = "row"

    def __init__(self, seed: int = 0) -> None:
        self._sq: dict[str, RunningSqNorm] = {}

    def collect(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        batches: Iterable[Batch],
        loss_fn: LossFn | None = None,
    ) -> None:
        self._sq = {name: RunningSqNorm(type_name(m).startswith("Conv")) for name, m in layers.items()}

        def hook_for(name: str, module: nn.Module):
            def hook(mod, args, output):
                self._sq[name].add_batch(args[0])

            return hook

        was_training = model.training
        model.eval()
        try:
            with Hooks() as hooks, torch.no_grad():
                for name, module in layers.items():
                    hooks.forward(module, hook_for(name, module))
                seen = 0
                for batch in batches:
                    model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                    seen += 1
        finally:
            model.train(was_training)
        if seen == 0:
            raise PrunekitError("no calibration batch was given")

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        if name not in self._sq:
            raise PrunekitError("the wanda criterion needs calibration batches (collect) before scoring")
        norm = self._sq[name].value().sqrt()
        weight = effective_weight(module)
        if weight.dim() > 2:
            norm = conv_input_norm(weight.shape, getattr(module, "groups", 1), norm)
        return wanda_scores(weight, norm)
