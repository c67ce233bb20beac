"""Sensitivity allocation: per-layer sparsities from measured sensitivity curves
(:mod:`prunekit.analysis.sensitivity`) that meet one global target exactly with the least predicted loss
(``allocation: sensitivity``; uniform and ERK allocations are in :mod:`prunekit.allocate.uniform`).

The sensitivity method follows the practice of Han et al. ("Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015: prune each layer alone, read off how far it can go) and
Distiller's sensitivity analysis (Zmora et al. 2019), turned from hand-picking into an optimisation the
way later work allocates per-layer budgets from per-layer error tables (AMC, He et al. ECCV 2018, searches
the same space with RL; SPDY, Frantar & Alistarh 2022, solves it exactly by dynamic programming). Here:

1. the predicted loss of a layer at sparsity ``s`` is its measured drop, interpolated linearly between the
   grid points, with ``(0, 0)`` for the dense layer. Measured drops are noisy (a pruned layer sometimes
   scores better than the dense one), so each curve is first made monotone by a cumulative maximum;
2. losses of different layers are assumed to add up (the usual separability assumption of these methods);
3. the pruned-weight count of each layer ``k_l`` is chosen to minimise ``sum_l f_l(k_l / n_l)`` subject to
   ``sum_l k_l = K`` and ``min_l <= k_l / n_l <= max_l``: a greedy marginal-cost allocation over the lower
   convex hull of each curve in weight counts (cheapest loss per pruned weight first). For convex curves
   this is the exact optimum (the Lagrangian / water-filling solution); for non-convex curves it is the
   optimum of their convex envelopes. Segments with the same marginal cost (e.g. many layers whose first
   grid points show no drop at all) share the last, partial step in proportion to their lengths, so ties
   do not depend on layer order.

Rounding, stated once: the global target is ``K = round(target * N)`` pruned weights over the ``N`` weights
of the layers given (Python's ``round``, as :mod:`prunekit.select` uses), and the result satisfies
``sum_l round(s_l * n_l) == K`` exactly, where ``s_l = k_l / n_l`` is the returned sparsity of layer ``l``.
A layer's maximum is honoured as ``k_l <= floor(max * n_l)``, its minimum as ``k_l >= ceil(min * n_l)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prunekit.errors import PrunekitError
from prunekit.spec import check_sparsity

Curve = tuple[Sequence[float], Sequence[float]]  # (sparsities, metric drops): higher drop = worse
_TIE = 1e-12  # relative tolerance under which two marginal costs count as equal


def monotone_curve(sparsities: Sequence[float], drops: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The curve through ``(0, 0)`` and the measured points, sorted by sparsity and made non-decreasing by
    a cumulative maximum (so it is also non-negative)."""
    s = np.asarray(sparsities, dtype=np.float64)
    d = np.asarray(drops, dtype=np.float64)
    if s.shape != d.shape or s.ndim != 1 or not len(s):
        raise PrunekitError("a sensitivity curve needs as many drops as sparsities (at least one)")
    if not (np.isfinite(s).all() and np.isfinite(d).all()):
        raise PrunekitError("a sensitivity curve holds a NaN or infinite value")
    if (s <= 0).any() or (s >= 1).any():
        raise PrunekitError(f"curve sparsities must be in (0, 1), got {s.tolist()}")
    order = np.argsort(s, kind="stable")
    s, d = np.concatenate([[0.0], s[order]]), np.concatenate([[0.0], d[order]])
    if (np.diff(s) == 0).any():
        raise PrunekitError(f"curve sparsities must be distinct, got {sorted(s[1:].tolist())}")
    return s, np.maximum.accumulate(d)


def _lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by ``x`` (collinear points dropped)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross <= _TIE * max(1.0, abs(y[i] - y[a])) * (x[i] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


@dataclass(frozen=True)
class LayerAllocation:
    """Per-layer sparsities and what they are predicted to cost."""

    sparsity: dict[str, float]  # k_l / n_l
    pruned: dict[str, int]  # k_l
    predicted_drop: dict[str, float]  # f_l(s_l), from the monotone curves
    target: float
    target_pruned: int  # K = round(target * N)
    method: str = "sensitivity"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "target_pruned": self.target_pruned,
            "predicted_drop_total": float(sum(self.predicted_drop.values())),
            "layers": {
                n: {"sparsity": s, "pruned": self.pruned[n], "predicted_drop": self.predicted_drop[n]}
                for n, s in self.sparsity.items()
            },
            **self.extra,
        }


def _bound(value: float | Mapping[str, float] | None, name: str, default: float, field: str) -> float:
    v = value.get(name, default) if isinstance(value, Mapping) else (default if value is None else value)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise PrunekitError(f"{field} for layer '{name}' must be a number in [0, 1], got {v!r}")
    return float(v)


def sensitivity_allocation(
    curves: Mapping[str, Curve],
    sizes: Mapping[str, int],
    target: float,
    *,
    max_sparsity: float | Mapping[str, float] | None = None,
    min_sparsity: float | Mapping[str, float] | None = None,
) -> LayerAllocation:
    """Per-layer sparsities meeting ``target`` exactly (in pruned weights) with the least predicted drop.

    ``curves[name] = (sparsities, drops)``; ``sizes[name]`` is the layer's weight count. ``max_sparsity``
    (one number or one per layer) defaults to the largest sparsity the layer's curve measured: beyond it
    nothing is known, so nothing is extrapolated. ``min_sparsity`` (e.g. what a layer is already pruned to)
    defaults to 0. Raises when the bounds make the target unreachable.
    """
    target = check_sparsity(target, "target sparsity")
    if set(curves) != set(sizes):
        missing = sorted(set(sizes) ^ set(curves))
        raise PrunekitError(f"curves and sizes must name the same layers; differ in: {', '.join(missing)}")
    if not sizes:
        raise PrunekitError("no layers to allocate sparsity to")
    names = list(sizes)
    total = 0
    lo_k: dict[str, int] = {}
    segments: list[tuple[float, int, int, int]] = []  # (marginal cost, layer index, order, length)
    points: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for li, name in enumerate(names):
        n = sizes[name]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise PrunekitError(f"layer '{name}' must have a positive integer weight count, got {n!r}")
        n = int(n)
        total += n
        s, d = monotone_curve(*curves[name])
        hi = _bound(max_sparsity, name, float(s[-1]), "max_sparsity")
        lo = _bound(min_sparsity, name, 0.0, "min_sparsity")
        if hi > s[-1] + 1e-12:
            raise PrunekitError(
                f"max_sparsity {hi} for layer '{name}' is beyond its curve, which ends at {s[-1]}: "
                "measure the sensitivity up to the largest sparsity you allow"
            )
        k_lo, k_hi = math.ceil(lo * n - 1e-9), math.floor(hi * n + 1e-9)
        if k_lo > k_hi:
            raise PrunekitError(f"layer '{name}': min_sparsity {lo} exceeds max_sparsity {hi}")
        # both integers around every grid point: between them the loss is linear in the count, so the
        # piecewise-linear curve through these points equals f(k / n) at every integer k
        near = np.concatenate([np.floor(s * n + 1e-9), np.ceil(s * n - 1e-9)])
        ks = np.unique(np.concatenate([[k_lo, k_hi], near]).clip(k_lo, k_hi)).astype(np.int64)
        fs = np.interp(ks / n, s, d)
        hull = _lower_hull(ks.astype(np.float64), fs)
        for order, (a, b) in enumerate(zip(hull[:-1], hull[1:])):
            length = int(ks[b] - ks[a])
            segments.append((float((fs[b] - fs[a]) / length), li, order, length))
        lo_k[name] = k_lo
        points[name] = (s, d, n)
    goal = int(round(target * total))
    remaining = goal - sum(lo_k.values())
    room = sum(seg[3] for seg in segments)
    if remaining < 0 or remaining > room:
        reachable = (sum(lo_k.values()) / total, (sum(lo_k.values()) + room) / total)
        raise PrunekitError(
            f"target sparsity {target} is out of reach with these per-layer bounds: the layers can be "
            f"pruned to between {reachable[0]:.4f} and {reachable[1]:.4f} overall"
        )
    taken = dict.fromkeys(names, 0)
    segments.sort(key=lambda seg: (seg[0], seg[1], seg[2]))
    i = 0
    while remaining > 0:  # take whole groups of equal marginal cost, cheapest first
        j = i + 1
        while j < len(segments) and segments[j][0] - segments[i][0] <= _TIE * max(1.0, abs(segments[i][0])):
            j += 1
        group = segments[i:j]
        length = sum(seg[3] for seg in group)
        if length <= remaining:
            shares = [seg[3] for seg in group]
        else:  # the last, partial step: shared in proportion to the lengths (largest remainders first)
            exact = [remaining * seg[3] / length for seg in group]
            shares = [int(math.floor(e)) for e in exact]
            by_remainder = sorted(range(len(group)), key=lambda g: (-(exact[g] - shares[g]), g))
            for g in by_remainder[: remaining - sum(shares)]:
                shares[g] += 1
        for seg, share in zip(group, shares):
            taken[names[seg[1]]] += share
        remaining -= sum(shares)
        i = j
    pruned = {name: lo_k[name] + taken[name] for name in names}
    sparsity = {name: pruned[name] / points[name][2] for name in names}
    predicted = {name: float(np.interp(sparsity[name], *points[name][:2])) for name in names}
    return LayerAllocation(sparsity, pruned, predicted, target, goal)


def predicted_drop(curves: Mapping[str, Curve], sparsity: Mapping[str, float]) -> float:
    """The summed predicted drop of per-layer sparsities under the monotone curves (to compare allocations;
    beyond a curve's last point the last value is used)."""
    return float(sum(np.interp(sparsity[n], *monotone_curve(*curves[n])) for n in sparsity))
