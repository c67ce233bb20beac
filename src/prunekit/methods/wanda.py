"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row (Sun, Liu, Bair & Kolter, "A Simple and
Effective Pruning Approach for Large Language Models", ICLR 2024).

``input_sq_norm[j]`` is the mean of x_j^2 over every calibration token (the paper's ||X_j||_2^2 up to a
common factor, which changes no ranking). For N:M the same score keeps the N largest of every M inputs.
"""

from __future__ import annotations

import torch

from prunekit.criteria.activation import wanda_scores
from prunekit.errors import PrunekitError
from prunekit.methods.base import register_llm_method
from prunekit.methods.pattern import keep_lowest_removed
from prunekit.spec import Spec


def wanda_mask(
    weight: torch.Tensor, input_sq_norm: torch.Tensor, spec: Spec, group: str = "row"
) -> torch.Tensor:
    """Keep-mask of a 2-D ``(out, in)`` weight; ``input_sq_norm`` has one entry per input feature."""
    if input_sq_norm.shape != weight.shape[1:]:
        raise PrunekitError(
            f"wanda needs one input norm per input feature: weight {tuple(weight.shape)}, "
            f"norms {tuple(input_sq_norm.shape)}"
        )
    scores = wanda_scores(weight.to(torch.float32), input_sq_norm.to(torch.float32).sqrt().unsqueeze(0))
    return keep_lowest_removed(scores, spec, group)


@register_llm_method("wanda", statistic="sq_norm", reference="Sun et al., ICLR 2024")
def wanda_layer(weight: torch.Tensor, input_sq_norm: torch.Tensor, spec: Spec, config) -> torch.Tensor:
    """Wanda as an LLM method: compared within each output row, as in the paper."""
    return torch.where(wanda_mask(weight, input_sq_norm, spec), weight, 0.0)  # one pass, no inverted mask
