"""Magnitude pruning of one weight matrix: remove the smallest |w| (Han, Pool, Tran & Dally, "Learning both
Weights and Connections for Efficient Neural Networks", NeurIPS 2015). The LLM baseline of the Wanda and
SparseGPT papers, compared per layer; per output row is the variant the Wanda paper also reports."""

from __future__ import annotations

import torch

from prunekit.methods.base import register_llm_method
from prunekit.methods.pattern import keep_lowest_removed
from prunekit.spec import Spec


def magnitude_mask(weight: torch.Tensor, spec: Spec, group: str = "layer") -> torch.Tensor:
    """Keep-mask of a 2-D ``(out, in)`` weight. ``group`` is ``"layer"`` or ``"row"`` (unstructured only;
    N:M always compares within its groups of M inputs)."""
    return keep_lowest_removed(weight.detach().abs(), spec, group)


@register_llm_method("magnitude", reference="Han et al., NeurIPS 2015")
def magnitude_layer(weight: torch.Tensor, statistic: None, spec: Spec, config) -> torch.Tensor:
    """Magnitude as an LLM method: compared per layer or per row (``config.magnitude_group``)."""
    return weight.masked_fill(~magnitude_mask(weight, spec, config.magnitude_group), 0)
