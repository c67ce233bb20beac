"""OWL, outlier-weighed layer-wise sparsity (Yin, Wu, Zhang, Liu, Fang, Zhu, Li & Wang, "Outlier Weighed
Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024).

A decoder block's outlier ratio D is the fraction of its Wanda scores |W_ij|·||X_j|| (over all its linear
layers together) above ``m`` times their mean. Blocks with more outliers are pruned less: the ratios are
scaled to [0, 2λ], centred so the mean density is the target's, and each block's sparsity is
``1 - density`` -- the reference code's formula. The mean sparsity over blocks equals the target and the
spread (max - min) is 2λ. The paper describes the range as [S - λ, S + λ]; that holds when the ratios are
spread evenly, but lopsided ratios can push one block up to 2λ(n-1)/n from the target, so a result outside
[0, 1) is an error asking for a smaller λ rather than a silently clipped (and no longer mean-exact) one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from prunekit.errors import PrunekitError


def outlier_ratio(scores: Iterable[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of all given scores strictly greater than ``m`` times their mean (the paper's D)."""
    tensors = [s.detach().to(torch.float64).reshape(-1) for s in scores]
    if not tensors or sum(t.numel() for t in tensors) == 0:
        raise PrunekitError("OWL needs at least one score")
    total = sum(t.numel() for t in tensors)
    mean = sum(float(t.sum()) for t in tensors) / total
    return sum(int((t > m * mean).sum()) for t in tensors) / total


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities from outlier ratios: spread ``2 * lam``, mean exactly ``sparsity``."""
    if not lam >= 0.0 or sparsity - lam < 0.0 or sparsity + lam >= 1.0:
        raise PrunekitError(
            f"OWL lambda must satisfy 0 <= lambda, sparsity - lambda >= 0 and sparsity + lambda < 1; "
            f"got lambda {lam} at sparsity {sparsity}"
        )
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min()) if r.numel() else 0.0
    if spread == 0.0:  # every block alike: nothing to reallocate (the reference code divides by zero here)
        return [float(sparsity)] * r.numel()
    scaled = (r - r.min()) / spread * (2 * lam)
    density = scaled - scaled.mean() + (1.0 - sparsity)
    out = [float(1.0 - d) for d in density]
    worst = min(out) if min(out) < 0.0 else max(out)
    if not 0.0 <= worst < 1.0:
        raise PrunekitError(
            f"OWL with lambda {lam} at sparsity {sparsity} gives a block sparsity of {worst:.4f}, outside "
            "[0, 1): these outlier ratios are lopsided; use a smaller --owl-lambda"
        )
    return out
