"""DSnoT: training-free prune-and-grow of a given mask toward the dense output (Zhang, Zhao, Lin, Sun, Yao,
Han, Tanner, Liu & Ji, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR 2024).

For one layer with dense weights ``W (out, in)``, the sparse weights ``S`` a pruning method produced (``S``
is ``W`` masked for magnitude and Wanda, ``W`` masked and updated for SparseGPT) and its keep-mask, and the
calibration inputs' per-feature mean ``mu_j = E[x_j]``, variance ``var_j = Var[x_j]`` and mean square
``E[x_j^2]``, each output row ``r`` is refined on its own. Its expected reconstruction error is

    e_r = E[(W_r - S_r) . x] = sum_j (W_rj - S_rj) mu_j.

One cycle swaps one pruned and one kept weight of every row whose ``|e_r|`` is above ``threshold``:

1. grow ``i = argmax_{j pruned} sign(e_r) W_rj mu_j / var_j``, over the ``j`` with a positive value (reviving
   ``j`` at its dense value moves ``e_r`` by ``-W_rj mu_j``, toward 0; the paper divides by the input's
   variance so that a weight whose contribution varies less from token to token is preferred);
2. prune ``k = argmin |S_rk| sqrt(E[x_k^2])`` (the Wanda score) over the kept ``k`` whose removal does not
   push the error further from 0 after the growth, ``sign(e_r - W_ri mu_i) S_rk mu_k <= 0`` (all kept
   weights when none qualifies); for N:M, ``k`` must lie in ``i``'s group of M inputs;
3. the swap is made only when it lowers ``|e_r|``: ``e_r <- e_r - W_ri mu_i + S_rk mu_k``; a row without
   such a swap is finished.

Every swap is one-for-one within a row (and within a group of M for N:M), so the count of kept weights of
every row and group is exactly the one given; the loop stops after ``cycles`` cycles (the paper's T) or when
every row is within ``threshold`` (the paper's epsilon). No gradients and no weight is changed other than
the revived (set to its dense value) and the newly pruned (set to 0) ones.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.pattern import check_llm_spec
from prunekit.spec import NM, Block, Spec


def row_errors(dense: torch.Tensor, sparse: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The paper's expected reconstruction error of every output row: ``(W - S) @ E[x]``."""
    return (dense.to(torch.float32) - sparse.to(torch.float32)) @ mean.to(torch.float32)


def dsnot_refine(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor,
    sq_mean: torch.Tensor,
    spec: Spec,
    cycles: int = 50,
    threshold: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_sparse, new_keep)``: float32, exactly zero where ``new_keep`` is False. Inputs are not
    modified. ``mean`` and ``sq_mean`` have one entry per input feature."""
    if dense.dim() != 2 or sparse.shape != dense.shape or keep.shape != dense.shape:
        raise PrunekitError(
            f"dsnot needs a dense and a sparse (out, in) weight and their keep-mask of one shape, got "
            f"{tuple(dense.shape)}, {tuple(sparse.shape)} and {tuple(keep.shape)}"
        )
    if mean.shape != dense.shape[1:] or sq_mean.shape != dense.shape[1:]:
        raise PrunekitError(
            f"dsnot needs one input mean and mean square per input feature of {tuple(dense.shape)}"
        )
    check_llm_spec(spec, tuple(dense.shape))
    if isinstance(spec, Block):  # a per-row swap would break the tiles
        raise PrunekitError("dsnot refines unstructured and N:M masks, not block patterns")
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0:
        raise PrunekitError(f"dsnot cycles must be an integer >= 0, got {cycles!r}")
    if not threshold >= 0.0:
        raise PrunekitError(f"dsnot threshold must be >= 0, got {threshold!r}")

    W = dense.detach().to(torch.float32)
    S = sparse.detach().to(torch.float32).masked_fill(~keep, 0.0)
    keep = keep.detach().clone().to(torch.bool)
    mu = mean.detach().to(torch.float32)
    sq = sq_mean.detach().to(torch.float32)
    var = (sq - mu.pow(2)).clamp_min(0.0)
    var = var.clamp_min(max(float(var.max()), 1e-30) * 1e-12)  # constant inputs: large, finite growth scores
    norm = sq.clamp_min(0.0).sqrt()
    contrib = W * mu  # W_rj mu_j: what reviving j removes from e_r
    growth = contrib / var  # the paper's growth score, up to sign(e_r)
    rows, cols = W.shape
    group = torch.arange(cols) // spec.m if isinstance(spec, NM) else None
    e = row_errors(W, S, mu)
    active = e.abs() > threshold
    index = torch.arange(rows)
    inf = torch.tensor(float("inf"))
    for _ in range(cycles):
        if not bool(active.any()):
            break
        r = index[active]
        sign = torch.sign(e[r]).unsqueeze(1)
        grow_score = torch.where(~keep[r], sign * growth[r], -inf)
        best, i = grow_score.max(dim=1)
        ok = best > 0
        e_grown = e[r] - contrib[r, i]
        s_row = S[r]
        removal = s_row * mu  # what pruning k adds to the error
        candidate = keep[r] & (torch.sign(e_grown).unsqueeze(1) * removal <= 0)
        if group is not None:
            same = group.unsqueeze(0) == group[i].unsqueeze(1)
            candidate &= same
            fallback = keep[r] & same
        else:
            fallback = keep[r]
        candidate = torch.where(candidate.any(dim=1, keepdim=True), candidate, fallback)
        prune_score = torch.where(candidate, s_row.abs() * norm, inf)
        low, k = prune_score.min(dim=1)
        e_new = e_grown + removal.gather(1, k.unsqueeze(1)).squeeze(1)
        ok &= torch.isfinite(low) & (e_new.abs() < e[r].abs())
        done = r[~ok]
        active[done] = False
        r, i, k, e_new = r[ok], i[ok], k[ok], e_new[ok]
        keep[r, i] = True
        S[r, i] = W[r, i]
        keep[r, k] = False
        S[r, k] = 0.0
        e[r] = e_new
        active[r] = e_new.abs() > threshold
    return S, keep
