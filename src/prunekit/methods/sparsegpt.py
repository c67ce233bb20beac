"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", ICML 2023), Algorithm 1.

For a layer ``W (out, in)`` and the Hessian ``H = mean(x x^T)`` of its inputs (a common factor such as the
paper's 2/n changes nothing below):

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and zero weights; ``H += damp * mean(diag H) * I``;
2. ``U = cholesky(H^-1)^T`` (upper), whose rows are the OBS update directions -- in float32, and in float64
   when a float32 factorisation fails (a nearly singular Hessian: few samples, tiny dampening); ``U`` is
   then rounded to float32 for the sweep;
3. columns are visited in blocks of ``blocksize``: at the start of each block the mask for the block is chosen
   from ``w^2 / U_jj^2`` (unstructured: the lowest fraction over the whole block; N:M: the lowest M-N of
   every M inputs, chosen when the sweep reaches each group; blocks of r x c: the tiles of the column block
   with the lowest summed ``w^2 / U_jj^2``, the OBS saliency of removing the whole tile if its columns were
   independent, as structured OBS variants rank groups); then column by column the pruned weights are
   zeroed and the error ``(w - q) / U_jj`` is spread over the block's later columns; the block's accumulated
   errors update all later columns at once (the lazy batch update).

The same lazy update is applied once more inside each block: a column's error reaches the other columns of
its group of ``INNER`` (16) at once and the rest of the block when the group is done, as one matrix
product; where the group's mask is already known (unstructured and block patterns) its column-by-column
sweep is one batched unit-triangular solve per row (:func:`_sweep_group`), the same equations without a
Python step per column. Every column still sees every earlier column's update before it is read, so this
is Algorithm 1 exactly (up to float rounding); it turns most of the per-column rank-1 updates, which are
memory-bound on a CPU, into matrix products. Layers that share their Hessian (q/k/v, gate/up: the runner
hands them the same tensor) share one factorisation (:func:`sparsegpt_layer`).

One deliberate difference from the reference code: it prunes every score ``<=`` the k-th smallest
(``k + 1`` or more weights per block); here exactly ``round(sparsity * block size)`` are pruned, ties by
position, so the asked sparsity is the delivered one.
"""

from __future__ import annotations

import logging
import weakref

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.base import register_llm_method
from prunekit.methods.pattern import block_keep, check_llm_spec
from prunekit.select import block_scores, nm_mask, remove_lowest_per_row
from prunekit.spec import NM, Block, Spec

log = logging.getLogger(__name__)


INNER = 16  # columns per inner lazy-update group


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask (True = prune) of the ``count`` lowest scores, ties by position."""
    return ~remove_lowest_per_row(scores.reshape(1, -1), count).reshape(scores.shape)


def dampened_hessian(
    hessian: torch.Tensor, damp: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, dead)``: a copy of the Hessian in ``dtype`` with dead inputs' diagonal set to 1 and
    ``damp * mean(diag H)`` added to the diagonal (step 1 above; ALPS prepares its Hessian the same way)."""
    H = hessian.detach().to(dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    return H, dead


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened inverse Hessian (float32) and the dead-input
    mask. Factorised in float32, again in float64 when that fails; an error when both do. Each intermediate
    is freed before the next is made: at 14336 inputs one matrix is 0.8 GB in float32."""
    for dtype in (torch.float32, torch.float64):
        H, dead = dampened_hessian(hessian, damp, dtype)
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if not int(info):
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if not int(info):
                return U.to(torch.float32), dead
        if dtype == torch.float32:
            log.warning(
                "float32 Cholesky of the dampened Hessian failed (damp %g): retrying in float64", damp
            )
    raise PrunekitError(
        f"the dampened Hessian is not positive definite even in float64 (damp {damp}); raise the dampening "
        "(e.g. 0.1) or give more calibration samples"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: Spec,
    blocksize: int = 128,
    damp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_weight, keep)`` for a 2-D ``(out, in)`` weight; ``new_weight`` is float32 with exact
    zeros where ``keep`` is False. Inputs are not modified. ``factor``: ``inverse_hessian_factor(hessian,
    damp)`` when already computed."""
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
    U, dead = factor if factor is not None else inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0.0
    inner = INNER if nm is None else nm.m * max(1, INNER // nm.m)  # N:M groups never straddle two
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
        width = i2 - i1
        for j1 in range(0, width, inner):
            j2 = min(j1 + inner, width)
            if nm is None:  # the mask is known: the group's sweep is one batched triangular solve
                Q1[:, j1:j2], Err1[:, j1:j2] = _sweep_group(W1[:, j1:j2], pruned[:, j1:j2], U1[j1:j2, j1:j2])
            else:
                for i in range(j1, j2):
                    if i % nm.m == 0:
                        # N:M: chosen on the weights as updated so far, when the sweep reaches the group
                        group = W1[:, i : i + nm.m].pow(2) / d[i : i + nm.m].pow(2)
                        pruned[:, i : i + nm.m] = ~nm_mask(group, nm.n, nm.m)
                    w = W1[:, i]
                    q = w.masked_fill(pruned[:, i], 0.0)
                    err = (w - q) / d[i]
                    W1[:, i:j2].addr_(err, U1[i, i:j2], alpha=-1.0)
                    Q1[:, i] = q
                    Err1[:, i] = err
            W1[:, j2:].addmm_(Err1[:, j1:j2], U1[j1:j2, j2:], alpha=-1.0)  # the group's errors, at once
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~pruned
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return W, keep


def _sweep_group(
    W0: torch.Tensor, pruned: torch.Tensor, U: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's column-by-column sweep over a group of columns whose mask is known, in one solve.

    Column ``k`` sees ``w_k = W0_k - sum_{i<k} err_i U_ik`` and gives ``err_k = p_k w_k / U_kk`` (``p`` = 1
    where pruned), so each row's errors ``e`` solve ``e (I + S diag(p / d)) = W0 diag(p / d)`` with ``S``
    the strictly upper part of ``U``: a unit upper-triangular system per row, solved for all rows at once.
    Returns ``(Q, Err)``: the kept weights as updated (exact zeros where pruned) and the errors."""
    d = torch.diagonal(U)
    a = pruned.to(W0.dtype) / d  # (rows, g)
    S = torch.triu(U, diagonal=1)
    M = S.unsqueeze(0) * a.unsqueeze(1)  # (rows, g, g): S diag(a_r)
    M.diagonal(dim1=1, dim2=2).fill_(1.0)
    err = torch.linalg.solve_triangular(
        M, (W0 * a).unsqueeze(1), upper=True, left=False, unitriangular=True
    ).squeeze(1)
    Q = (W0 - err @ S).masked_fill_(pruned, 0.0)
    return Q, err


class _LastFactor:
    """The factorisation of the last Hessian seen, kept while that Hessian lives: the runner hands the layers
    that share an input (q/k/v, gate/up) the very same Hessian tensor, and they come one after another."""

    def __init__(self) -> None:
        self.entry: tuple[weakref.ref, float, tuple[torch.Tensor, torch.Tensor]] | None = None

    def get(self, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.entry is not None and self.entry[0]() is hessian and self.entry[1] == damp:
            return self.entry[2]
        self.entry = None  # free the old factor before making the new one
        factor = inverse_hessian_factor(hessian, damp)
        self.entry = (weakref.ref(hessian, self._forget), damp, factor)
        return factor

    def _forget(self, ref: weakref.ref) -> None:
        if self.entry is not None and self.entry[0] is ref:
            self.entry = None


_LAST_FACTOR = _LastFactor()


@register_llm_method("sparsegpt", statistic="gram", reference="Frantar & Alistarh, ICML 2023")
def sparsegpt_layer(weight: torch.Tensor, hessian: torch.Tensor, spec: Spec, config) -> torch.Tensor:
    """SparseGPT as an LLM method: ``config.blocksize`` columns per lazy update, ``config.damp`` dampening;
    consecutive layers given the same Hessian tensor share its factorisation."""
    factor = _LAST_FACTOR.get(hessian, config.damp)
    return sparsegpt_prune(weight, hessian, spec, config.blocksize, config.damp, factor=factor)[0]
