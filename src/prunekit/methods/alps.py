"""ALPS: ADMM on the layer-wise reconstruction objective with an l0 constraint, then a preconditioned
conjugate-gradient refit on the support found (Meng, Behdin, Wang & Mazumder, "ALPS: Improved Optimization
for Highly Sparse One-Shot Pruning for Large Language Models", NeurIPS 2024), Algorithms 1 and 2.

For a layer ``W^ (out, in)`` and the mean ``H = E[x x^T]`` of its inputs, the problem is

    min_W  f(W) = 1/2 tr((W - W^) H (W - W^)^T)   s.t.  W in C

with ``C`` the matrices of the asked pattern (unstructured: at most ``k = round((1 - s) out in)`` nonzeros
in the layer, or in each row with ``group="row"``; N:M: at most N nonzeros in every M inputs of a row).
ADMM on the split ``W = D``, ``D in C`` with the scaled-free dual ``V`` and penalty ``rho``:

    W <- (H + rho I)^-1 (H W^ - V + rho D)          (row form: (W^ H - V + rho D) (H + rho I)^-1)
    D <- P_C(W + V / rho)                           (keep the largest |.| allowed by the pattern)
    V <- V + rho (W - D)

starting from ``D = P_C(W^)``, ``V = 0``. The penalty follows the paper's schedule: every 3 iterations,
with ``s`` the number of positions whose membership in the support changed since the last check,
``rho *= 1.3`` if ``s >= 0.1 k``, ``1.2`` if ``s >= 0.005 k``, ``1.1`` if ``s >= 1``; the ADMM stops when the
support did not change (``s = 0``) or after ``iters`` iterations. ``(H + rho I)^-1`` is applied through one
eigendecomposition of ``H``, so each iteration is two ``out x in x in`` products.

The refit minimises ``f`` over the weights on the support of ``D`` (pruned weights exactly zero) by
conjugate gradients on every row at once, starting from ``D``, with the paper's diagonal (Jacobi)
preconditioner; ``refit_iters = 0`` returns ``D`` itself.

Numerics shared with SparseGPT (:mod:`prunekit.methods.sparsegpt`): inputs never seen (``H_jj = 0``) get
``H_jj = 1`` and zero weights; ``damp * mean(diag H)`` is added to the diagonal. The problem is solved in the
scaled variables ``W diag(H)^1/2`` (so ``diag H = 1``: ``rho`` is relative to it, as in the paper, and the
projection ranks ``|W_ij| sqrt(H_jj)``, Wanda's score); the objective and constraint are unchanged by it.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.base import register_llm_method
from prunekit.methods.pattern import check_llm_spec, keep_lowest_removed
from prunekit.methods.sparsegpt import dampened_hessian
from prunekit.select import nm_mask
from prunekit.spec import NM, Block, Spec

CHECK_EVERY = 3  # iterations between support-change checks (the paper's schedule)


def objective(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """``1/2 tr((W - W^) H (W - W^)^T)``: the layer's output error, 1/2 E||(W - W^) x||^2."""
    delta = (weight - dense).to(torch.float64)
    return 0.5 * float(((delta @ hessian.to(torch.float64)) * delta).sum())


def rho_factor(changed: int, k: int) -> float:
    """The paper's penalty growth from the support change ``changed`` over the last check (k: nonzeros)."""
    if changed >= 0.1 * k:
        return 1.3
    if changed >= 0.005 * k:
        return 1.2
    if changed >= 1:
        return 1.1
    return 1.0


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, damp: float):
    W = weight.detach().to(torch.float32).clone()
    H, dead = dampened_hessian(hessian, damp)
    W[:, dead] = 0.0
    scale = torch.diagonal(H).sqrt()
    Hn = H / scale.unsqueeze(1) / scale.unsqueeze(0)
    return W, H, Hn, scale


def pcg_refit(
    start: torch.Tensor, keep: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor, iters: int
) -> torch.Tensor:
    """Minimise ``1/2 tr((W - T) H (W - T)^T)`` over ``W`` supported on ``keep`` by ``iters`` steps of
    Jacobi-preconditioned conjugate gradients per row, from ``start`` (masked). ``H`` symmetric positive
    definite; returns float32 with exact zeros off the support."""
    mask = keep.to(torch.float32)
    X = start.to(torch.float32) * mask
    if iters <= 0:
        return X
    H = hessian.to(torch.float32)
    inv_diag = 1.0 / torch.diagonal(H)
    R = (target.to(torch.float32) @ H - X @ H) * mask  # minus the gradient, on the support
    Z = R * inv_diag
    P = Z.clone()
    rz = (R * Z).sum(dim=1)
    for _ in range(iters):
        AP = (P @ H) * mask
        curvature = (P * AP).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        X += alpha.unsqueeze(1) * P
        R -= alpha.unsqueeze(1) * AP
        Z = R * inv_diag
        rz_new = (R * Z).sum(dim=1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        P = Z + beta.unsqueeze(1) * P
        rz = rz_new
    return X * mask


def alps_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: Spec,
    *,
    iters: int = 300,
    refit_iters: int = 10,
    rho: float = 0.1,
    damp: float = 0.01,
    group: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_weight, keep)`` for a 2-D ``(out, in)`` weight: float32, exactly zero where ``keep`` is
    False. ``iters = 0`` keeps the initial projection (largest ``|W_ij| sqrt(H_jj)``); ``refit_iters = 0``
    returns the ADMM's ``D``. Inputs are not modified."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise PrunekitError(
            f"alps needs a (out, in) weight and an (in, in) Hessian, got {tuple(weight.shape)} and "
            f"{tuple(hessian.shape)}"
        )
    check_llm_spec(spec, tuple(weight.shape))
    if isinstance(spec, Block):  # the paper's projection and schedule are for unstructured and N:M supports
        raise PrunekitError("alps prunes unstructured and N:M patterns, not block patterns")
    for name, value in (("iters", iters), ("refit_iters", refit_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PrunekitError(f"alps {name} must be an integer >= 0, got {value!r}")
    if not rho > 0.0 or not damp > 0.0:
        raise PrunekitError(f"alps rho and damp must be > 0, got {rho!r} and {damp!r}")
    group = "row" if isinstance(spec, NM) else group

    W, _, Hn, scale = _prepare(weight, hessian, damp)
    Wn = W * scale  # scaled variables: the objective is 1/2 tr((X - Wn) Hn (X - Wn)^T)

    keep = keep_lowest_removed(Wn.abs(), spec, group)  # validates the pattern; ties by position
    kept = int(keep.sum())

    def project(Z: torch.Tensor) -> torch.Tensor:  # the same rule as keep_lowest_removed, without its sort
        if isinstance(spec, NM):
            return nm_mask(Z.abs(), spec.n, spec.m)
        out = torch.zeros(Z.shape, dtype=torch.bool)
        if group == "row":
            per_row = kept // Z.shape[0]
            out.scatter_(1, torch.topk(Z.abs(), per_row, dim=1, sorted=False).indices, True)
        else:
            out.view(-1)[torch.topk(Z.abs().reshape(-1), kept, sorted=False).indices] = True
        return out

    D = Wn * keep
    if iters:
        G = Wn @ Hn
        evals, Q = torch.linalg.eigh(Hn)
        V = torch.zeros_like(Wn)
        checked = keep
        for t in range(iters):
            B = G - V + rho * D
            Wt = ((B @ Q) / (evals + rho)) @ Q.T
            Z = Wt + V / rho
            keep = project(Z)
            D = Z * keep
            V += rho * (Wt - D)
            if (t + 1) % CHECK_EVERY == 0:
                changed = int((keep ^ checked).sum())
                if changed == 0:
                    break
                rho *= rho_factor(changed, kept)
                checked = keep
    X = pcg_refit(D, keep, Wn, Hn, refit_iters)
    return X / scale, keep


@register_llm_method("alps", statistic="gram", reference="Meng et al., NeurIPS 2024")
def alps_layer(weight: torch.Tensor, hessian: torch.Tensor, spec: Spec, config) -> torch.Tensor:
    """ALPS as an LLM method: ``config.alps_iters`` ADMM iterations, ``config.refit_iters`` PCG steps,
    ``config.damp`` dampening, support per layer (unstructured) as in the paper."""
    return alps_prune(
        weight,
        hessian,
        spec,
        iters=config.alps_iters,
        refit_iters=config.refit_iters,
        rho=config.alps_rho,
        damp=config.damp,
    )[0]
