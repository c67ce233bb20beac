"""Per-layer sparsities from the layers' sizes alone.

* :func:`uniform_allocation` -- every layer at the target (the recipes' default, ``allocation: uniform``).
* :func:`erk_allocation` -- Erdos-Renyi-Kernel sparsities from the weight shapes (Evci, Gale, Menick,
  Castro & Elsen, "Rigging the Lottery: Making All Tickets Winners", ICML 2020: RigL's default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from prunekit.spec import check_sparsity


def global_count(sizes: Mapping[str, int], target: float) -> int:
    """``round(target * N)``: the number of weights a global target removes from these layers."""
    return int(round(check_sparsity(target, "target sparsity") * sum(int(n) for n in sizes.values())))


def uniform_allocation(sizes: Mapping[str, int], target: float) -> dict[str, float]:
    """Every layer at ``target`` (the per-layer counts then round separately, so their sum may differ
    from :func:`global_count` by up to half a weight per layer)."""
    target = check_sparsity(target, "target sparsity")
    return {name: target for name in sizes}


def erk_allocation(shapes: Mapping[str, Sequence[int]], target: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel sparsities (Evci et al., "Rigging the Lottery", ICML 2020, Sec. 3): the density
    of a layer with weight shape ``(d_1, ..., d_k)`` is ``eps * sum(d) / prod(d)``, with one ``eps`` chosen
    so the overall density is ``1 - target``; a layer whose density would exceed 1 is kept dense and
    ``eps`` is solved again over the others (as the paper's code does). Fractions, not exact counts."""
    target = check_sparsity(target, "target sparsity")
    sizes = {n: math.prod(int(d) for d in s) for n, s in shapes.items()}
    raw = {n: sum(int(d) for d in s) / sizes[n] for n, s in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(sizes):  # (every layer dense only at target 0)
        budget = (1.0 - target) * sum(sizes.values()) - sum(sizes[n] for n in dense)
        eps = budget / sum(raw[n] * sizes[n] for n in sizes if n not in dense)
        over = {n for n in sizes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 0.0 if n in dense else 1.0 - eps * raw[n] for n in shapes}
