"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", ICML 2023), Algorithm 1.

For a layer ``W (out, in)`` and the Hessian ``H = mean(x x^T)`` of its inputs (a common factor such as the
paper's 2/n changes nothing below):

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and zero weights; ``H += damp * mean(diag H) * I``;
2. ``U = cholesky(H^-1)^T`` (upper), whose rows are the OBS update directions;
3. columns are visited in blocks of ``blocksize``: at the start of each block the mask for the block is chosen
   from ``w^2 / U_jj^2`` (unstructured: the lowest fraction over the whole block; N:M: the lowest M-N of
   every M inputs, chosen when the sweep reaches each group; blocks of r x c: the tiles of the column block
   with the lowest summed ``w^2 / U_jj^2``, the OBS saliency of removing the whole tile if its columns were
   independent, as structured OBS variants rank groups); then column by column the pruned weights are
   zeroed and the error ``(w - q) / U_jj`` is spread over the block's later columns; the block's accumulated
   errors update all later columns at once (the lazy batch update).

One deliberate difference from the reference code: it prunes every score ``<=`` the k-th smallest
(``k + 1`` or more weights per block); here exactly ``round(sparsity * block size)`` are pruned, ties by
position, so the asked sparsity is the delivered one.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.base import register_llm_method
from prunekit.methods.pattern import block_keep, check_llm_spec
from prunekit.select import block_scores, nm_mask
from prunekit.spec import NM, Block, Spec


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask (True = prune) of the ``count`` lowest scores, ties by position."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    if count:
        pruned[torch.sort(scores.reshape(-1), stable=True).indices[:count]] = True
    return pruned.reshape(scores.shape)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened inverse Hessian and the dead-input mask."""
    H = hessian.detach().to(torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        raise PrunekitError(
            f"the dampened Hessian is not positive definite (damp {damp}); raise the dampening (e.g. 0.1) "
            "or give more calibration samples"
        )
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info):
        raise PrunekitError(f"the inverse Hessian is not positive definite (damp {damp}); raise damp")
    return U, dead


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, spec: Spec, blocksize: int = 128, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_weight, keep)`` for a 2-D ``(out, in)`` weight; ``new_weight`` is float32 with exact
    zeros where ``keep`` is False. Inputs are not modified."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise PrunekitError(
            f"sparsegpt needs a (out, in) weight and an (in, in) Hessian, got {tuple(weight.shape)} and "
            f"{tuple(hessian.shape)}"
        )
    check_llm_spec(spec, tuple(weight.shape))
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PrunekitError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not damp > 0.0:
        raise PrunekitError(f"damp must be > 0, got {damp!r}")
    nm = spec if isinstance(spec, NM) else None
    if nm is not None and blocksize % nm.m:
        raise PrunekitError(f"blocksize {blocksize} must be a multiple of M={nm.m} for N:M")
    tile = spec.shape if isinstance(spec, Block) else None
    if tile is not None and blocksize % tile[1]:
        raise PrunekitError(f"blocksize {blocksize} must be a multiple of the block's {tile[1]} columns")

    W = weight.detach().to(torch.float32).clone()
    U, dead = inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0.0
    rows, cols = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        if tile is not None:
            saliency = block_scores(W1.pow(2) / d.pow(2), tile)
            pruned = ~block_keep(saliency, spec, "layer", W1.shape)
        elif nm is None:
            pruned = _lowest(W1.pow(2) / d.pow(2), int(round(spec.sparsity * W1.numel())))
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                # N:M: chosen on the weights as updated so far, when the sweep reaches the group
                group = W1[:, i : i + nm.m].pow(2) / d[i : i + nm.m].pow(2)
                pruned[:, i : i + nm.m] = ~nm_mask(group, nm.n, nm.m)
            w = W1[:, i]
            q = w.masked_fill(pruned[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~pruned
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return W, keep


@register_llm_method("sparsegpt", statistic="gram", reference="Frantar & Alistarh, ICML 2023")
def sparsegpt_layer(weight: torch.Tensor, hessian: torch.Tensor, spec: Spec, config) -> torch.Tensor:
    """SparseGPT as an LLM method: ``config.blocksize`` columns per lazy update, ``config.damp`` dampening."""
    return sparsegpt_prune(weight, hessian, spec, config.blocksize, config.damp)[0]
