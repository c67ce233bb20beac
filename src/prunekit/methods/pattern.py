"""Scores to a keep-mask under an unstructured or N:M spec: the one place the LLM kernels share."""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.select import nm_mask, row_mask, unstructured_masks
from prunekit.spec import NM, Spec, Unstructured

LLM_GROUPS = ("layer", "row")


def check_llm_pattern(spec: Spec) -> None:
    """Raise unless ``spec`` is unstructured or N:M (the patterns the one-shot kernels produce)."""
    if not isinstance(spec, (Unstructured, NM)):
        raise PrunekitError(f"one-shot LLM pruning takes an unstructured or N:M pattern, got {spec}")


def check_llm_spec(spec: Spec, shape: tuple[int, ...], layer: str = "weight") -> None:
    """Raise unless ``spec`` is unstructured or N:M and fits a ``(out, in)`` weight of ``shape``."""
    check_llm_pattern(spec)
    spec.check(tuple(shape), layer)


def keep_lowest_removed(scores: torch.Tensor, spec: Spec, group: str) -> torch.Tensor:
    """Remove the lowest scores: ``round(sparsity * n)`` per layer or per row, or all but N of every M inputs.

    Ties are broken by position, so the mask is deterministic."""
    if scores.dim() != 2:
        raise PrunekitError(f"expected a 2-D (out, in) weight, got shape {tuple(scores.shape)}")
    check_llm_spec(spec, tuple(scores.shape))
    if isinstance(spec, NM):
        return nm_mask(scores, spec.n, spec.m)
    if group == "row":
        return row_mask(scores, spec.sparsity)
    if group != "layer":
        raise PrunekitError(f"comparison group must be one of {', '.join(LLM_GROUPS)}, got {group!r}")
    # the per-layer radix select runs on the host (its histograms are CPU buffers); the mask goes back
    return unstructured_masks({"w": scores.to("cpu")}, spec.sparsity, "layer")["w"].to(scores.device)
