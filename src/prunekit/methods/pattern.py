"""Scores to a keep-mask under an unstructured, N:M or block spec: the one place the LLM kernels share.

Block patterns (``Block((r, c), sparsity)``, e.g. 8x1 blocks along the output for the batch-1 block
kernels of :mod:`prunekit.runtime.gemv`) rank whole tiles by the L2 norm of their scores (the group-lasso
norm of Yuan & Lin 2006, as block pruning of language models does, e.g. Lagunas et al., "Block Pruning
For Faster Transformers", EMNLP 2021): :func:`block_l2_scores`. Compared per layer, or with ``"row"`` per
block-row (the ``r`` output rows a tile spans: Wanda's per-output comparison, one tile high).
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.select import block_scores, expand_blocks, nm_mask, row_mask, unstructured_masks
from prunekit.spec import NM, Block, Spec, Unstructured

LLM_GROUPS = ("layer", "row")


def check_llm_pattern(spec: Spec) -> None:
    """Raise unless ``spec`` is unstructured, N:M or block (the patterns the one-shot kernels produce)."""
    if not isinstance(spec, (Unstructured, NM, Block)):
        raise PrunekitError(f"one-shot LLM pruning takes an unstructured, N:M or block pattern, got {spec}")


def check_llm_spec(spec: Spec, shape: tuple[int, ...], layer: str = "weight") -> None:
    """Raise unless ``spec`` is unstructured, N:M or block and fits a ``(out, in)`` weight of ``shape``."""
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
    if isinstance(spec, Block):
        return block_keep(block_l2_scores(scores, spec.shape), spec, group, scores.shape)
    if group == "row":
        return row_mask(scores, spec.sparsity)
    if group != "layer":
        raise PrunekitError(f"comparison group must be one of {', '.join(LLM_GROUPS)}, got {group!r}")
    return unstructured_masks({"w": scores}, spec.sparsity, "layer")["w"]


def block_l2_scores(scores: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Squared L2 norm of the scores of every ``shape`` tile of a 2-D ``(out, in)`` score matrix, as a
    ``(out / r, in / c)`` matrix (squared: the same ranking as the norm, no square root)."""
    return block_scores(scores.detach().to(torch.float32).pow(2), shape)


def block_keep(tiles: torch.Tensor, spec: Block, group: str, like: torch.Size) -> torch.Tensor:
    """Element keep-mask from tile scores: the lowest ``round(sparsity * tiles)`` tiles removed per layer,
    or per block-row with ``group="row"`` (ties by position)."""
    if group == "row":
        keep = row_mask(tiles, spec.sparsity)
    elif group == "layer":
        keep = unstructured_masks({"w": tiles}, spec.sparsity, "layer")["w"]
    else:
        raise PrunekitError(f"comparison group must be one of {', '.join(LLM_GROUPS)}, got {group!r}")
    return expand_blocks(keep, spec.shape, like)
