"""Reconstruction of the kept weights after the masks are chosen: masks fixed, pruned weights exactly zero,
the kept ones refit so the pruned block (or sub-block) reproduces the dense one's outputs on the
calibration activations.

Block- and sub-block-wise refitting with a few epochs of a first-order optimiser is the "regional
optimisation" of Wanda++ (Yang et al., "Wanda++: Pruning Large Language Models via Regional Gradients",
2025) and the local reconstruction of Wagner, Roux, Zimmer & Pokutta ("A Free Lunch in LLM Compression:
Revisiting Retraining after Pruning", 2025), who find attention and MLP refit separately as good as larger
windows and better than single matrices. :func:`fit_kept_weights` solves

    min_{W_l : W_l = 0 off keep_l}   mean_n || f(x_n; W) - y_n ||^2

over the calibration inputs ``x_n`` and dense outputs ``y_n`` by Adam (Kingma & Ba, ICLR 2015), with the
gradients of pruned entries zeroed before each step (so Adam's moments, and the entries, stay exactly
zero). The error is measured over every sample before and after, and the starting weights are restored
when the fit made it worse: the result never has a larger error than its start.

:func:`masked_least_squares` is the closed form for one linear layer, exact where the layer's output is the
target: per output row ``r`` with kept inputs ``S_r``, ``min || X w - Y_r ||^2`` over ``w`` supported on
``S_r`` is ``w_S = (X_S^T X_S)^-1 X_S^T Y_r``; with the statistics ``H = E[x x^T]`` of the layer's inputs and
``C = E[x x_d^T]`` against the dense layer's inputs ``x_d`` (target ``Y_r = x_d . W^_r``), ``w_S =
H_SS^-1 (C W^_r)_S`` (``C = H`` when both see the same input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prunekit.errors import PrunekitError

Forward = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def output_error(forward: Forward, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 4) -> float:
    """``mean_n ||f(x_n) - y_n||^2`` per element, in float64, over every sample (dim 0)."""
    total = 0.0
    for start in range(0, inputs.shape[0], batch):
        out = forward(inputs[start : start + batch]).to(torch.float64)
        total += float((out - targets[start : start + batch].to(torch.float64)).pow(2).sum())
    return total / max(targets.numel(), 1)


def fit_kept_weights(
    forward: Forward,
    weights: Sequence[torch.nn.Parameter],
    keeps: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int = 1,
    lr: float = 2e-3,
    batch: int = 4,
    seed: int = 0,
) -> tuple[float, float]:
    """Refit the kept entries of ``weights`` (in place) so ``forward(inputs) ~ targets``; returns the
    output error ``(before, after)`` with ``after <= before``. ``forward`` must depend on ``weights``
    through autograd; nothing else is trained (the caller freezes the rest). ``inputs`` and ``targets``
    are ``(N, ...)`` sample-first tensors, visited in a seeded random order, ``batch`` samples a step."""
    if len(weights) != len(keeps) or any(w.shape != k.shape for w, k in zip(weights, keeps)):
        raise PrunekitError("reconstruction needs one keep-mask of the weight's shape per weight")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise PrunekitError(f"reconstruction epochs must be an integer >= 0, got {epochs!r}")
    if not lr > 0.0:
        raise PrunekitError(f"reconstruction learning rate must be > 0, got {lr!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PrunekitError(f"reconstruction batch must be a positive integer, got {batch!r}")
    if inputs.shape[0] != targets.shape[0]:
        raise PrunekitError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    masks = [k.to(device=w.device, dtype=w.dtype) for w, k in zip(weights, keeps)]
    with torch.no_grad():
        for w, m in zip(weights, masks):
            w.mul_(m)  # pruned entries exactly zero from the start
    before = output_error(forward, inputs, targets, batch)
    if epochs == 0 or not weights:
        return before, before
    start = [w.detach().clone() for w in weights]
    optimiser = torch.optim.Adam(list(weights), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(inputs.shape[0], generator=generator)
            for first in range(0, len(order), batch):
                rows = order[first : first + batch]
                optimiser.zero_grad(set_to_none=False)
                out = forward(inputs[rows])
                loss = (out.to(torch.float32) - targets[rows].to(torch.float32)).pow(2).mean()
                loss.backward()
                with torch.no_grad():
                    for w, m in zip(weights, masks):
                        if w.grad is not None:
                            w.grad.mul_(m)
                optimiser.step()
                with torch.no_grad():
                    for w, m in zip(weights, masks):
                        w.mul_(m)  # exact zeros whatever the optimiser's arithmetic
    after = output_error(forward, inputs, targets, batch)
    if not after <= before:  # worse (or NaN): keep the start
        with torch.no_grad():
            for w, s in zip(weights, start):
                w.copy_(s)
        after = before
    for w in weights:
        w.grad = None
    return before, after


def masked_least_squares(
    dense: torch.Tensor,
    keep: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None = None,
    damp: float = 0.01,
    chunk: int = 64,
) -> torch.Tensor:
    """The least-squares weights on ``keep`` (module docstring): float32 ``(out, in)``, exact zeros off
    ``keep``. ``gram = E[x x^T]`` of the layer's inputs, ``cross = E[x x_d^T]`` (``None``: ``gram``);
    ``damp * mean(diag gram)`` is added to the diagonal (ridge, as SparseGPT dampens)."""
    if dense.dim() != 2 or keep.shape != dense.shape or gram.shape != (dense.shape[1],) * 2:
        raise PrunekitError(
            f"least squares needs a (out, in) weight, its keep-mask and an (in, in) Gram matrix, got "
            f"{tuple(dense.shape)}, {tuple(keep.shape)} and {tuple(gram.shape)}"
        )
    if cross is not None and cross.shape != gram.shape:
        raise PrunekitError(f"the cross matrix must be {tuple(gram.shape)}, got {tuple(cross.shape)}")
    if not damp > 0.0:
        raise PrunekitError(f"damp must be > 0, got {damp!r}")
    W = dense.detach().to(torch.float32)
    H = gram.detach().to(torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    rhs = (
        W @ (H if cross is None else cross.detach().to(torch.float32)).T
    )  # row r: (C W^_r) = E[x (x_d . W^_r)]
    keep = keep.to(torch.bool) & ~dead.unsqueeze(0)
    out = torch.zeros_like(W)
    width = int(keep.sum(dim=1).max()) if keep.numel() else 0
    if width == 0:
        return out
    for first in range(0, W.shape[0], chunk):
        k = keep[first : first + chunk]
        # each row's kept indices, padded to the widest row with index 0 (masked out below)
        idx = torch.sort((~k).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.gather(k, 1, idx)
        A = H[idx.unsqueeze(2), idx.unsqueeze(1)]  # (rows, width, width)
        pad = ~(valid.unsqueeze(2) & valid.unsqueeze(1))
        A = A.masked_fill(pad, 0.0)
        A.diagonal(dim1=1, dim2=2).add_((~valid).to(A.dtype))  # identity on padding
        b = torch.gather(rhs[first : first + chunk], 1, idx).masked_fill(~valid, 0.0)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info.max()):
            raise PrunekitError("the dampened Gram matrix is not positive definite; raise the dampening")
        x = torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2).masked_fill(~valid, 0.0)
        out[first : first + chunk].scatter_(1, idx, x)
    return out.masked_fill(~keep, 0.0)
