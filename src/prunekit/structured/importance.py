"""Importance of the units (channels, neurons, heads) of one coupled group: pure, vectorised scores.

A group is a list of :class:`Member` s, each a parameter tensor with an ``owner`` index tensor broadcastable
to it: ``owner[...]`` is the unit (0..n_units-1) an element belongs to, or -1 when the element is outside the
group. Every score is a float32 tensor of shape ``(n_units,)``; higher means more important (keep).

Criteria, each checkable against its paper:

- ``l1`` / ``l2``, :func:`group_norm` -- the L1 (p=1) or L2 (p=2) norm of every coupled element a unit owns,
  all members and roles together. L1 filter norms: Li, Kadav, Durdanovic, Samet & Graf, "Pruning Filters for
  Efficient ConvNets", ICLR 2017. Aggregation over the whole coupled group rather than one layer: Fang, Ma,
  Song, Mi & Wang, "DepGraph: Towards Any Structural Pruning", CVPR 2023.
- ``bn_scale``, :func:`bn_scale` -- |gamma| of the BatchNorm that follows each channel: Liu, Li, Shen, Huang,
  Yan & Zhang, "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017.
- ``taylor``, :func:`taylor` -- first-order Taylor estimate of the loss change when a unit is removed,
  |sum_{s in unit} w_s g_s| over every parameter of the unit: Molchanov, Mallya, Tyree, Frosio & Kautz,
  "Importance Estimation for Neural Network Pruning", CVPR 2019 (the group / filter variant).
- ``fpgm``, :func:`fpgm` -- Filter Pruning via Geometric Median: sum of Euclidean distances from a unit's
  filter to every other filter; filters near the geometric median are redundant and score low. He, Liu,
  Wang, Hu & Yang, "Filter Pruning via Geometric Median for Deep Convolutional Neural Networks Acceleration",
  CVPR 2019.
- ``activation_mean``, :func:`activation_mean` -- mean |activation| of each unit over calibration data, in
  the style of Polyak & Wolf, "Channel-Level Acceleration of Deep Face Representations", IEEE Access 2015.
- ``apoz``, :func:`apoz` -- 1 - Average Percentage of Zeros of each unit's activations (more zeros, less
  important): Hu, Peng, Tai & Tang, "Network Trimming: A Data-Driven Neuron Pruning Approach towards
  Efficient Deep Architectures", arXiv:1607.03250, 2016.
- ``random``, :func:`random_scores` -- the baseline.

Vectorisation: the value tensor is first summed over the dimensions where ``owner`` has size 1 (the owner is
constant along them), then the few remaining entries are scattered into units with ``index_add_``; -1 entries
are masked out. Memory stays at the size of the parameter, never of an expanded int64 owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prunekit.criteria.random import random_scores
from prunekit.errors import PrunekitError
from prunekit.registry import STRUCTURED_IMPORTANCE

log = logging.getLogger(__name__)

ROLES = ("out", "in", "norm", "bias", "other")


@dataclass(frozen=True, eq=False)
class Member:
    """One parameter of a coupled group and which unit each of its elements belongs to.

    ``eq=False``: members compare and hash by identity (tensor fields have no usable ``==``).
    """

    name: str  # parameter name, e.g. "layer1.0.conv1.weight"
    tensor: torch.Tensor  # the parameter (or its gradient-bearing tensor)
    owner: torch.Tensor  # integer, broadcastable to tensor.shape; unit index per element, -1 = not in group
    role: str  # "out" producer rows | "in" consumer columns | "norm" BN/LN/GN weight | "bias" | "other"
    module_type: str = ""  # e.g. "Conv2d", "BatchNorm2d"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"member '{self.name}': unknown role '{self.role}'; allowed: {', '.join(ROLES)}")
        _check_owner(self.owner, self.tensor.shape, f"member '{self.name}'")


# ----------------------------------------------------------------------------------------------- helpers


def _check_owner(owner: torch.Tensor, shape: torch.Size, what: str) -> None:
    if owner.dtype.is_floating_point or owner.dtype.is_complex or owner.dtype == torch.bool:
        raise ValueError(f"{what}: owner must be an integer tensor, got {owner.dtype}")
    try:
        ok = torch.broadcast_shapes(owner.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{what}: owner of shape {tuple(owner.shape)} does not broadcast to {tuple(shape)}")


def _reduce_to_owner(
    values: torch.Tensor, owner: torch.Tensor, n_units: int, what: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum ``values`` over the dims where ``owner`` is broadcast: (flat values, flat owner, multiplicity).

    ``multiplicity``: how many original elements each returned entry sums (the product of the reduced dims).
    """
    _check_owner(owner, values.shape, what)
    owner = owner.to(device=values.device, dtype=torch.long)
    owner = owner.reshape((1,) * (values.dim() - owner.dim()) + tuple(owner.shape))
    dims = [d for d in range(values.dim()) if owner.shape[d] == 1 and values.shape[d] != 1]
    multiplicity = 1
    for d in dims:
        multiplicity *= values.shape[d]
    if dims:
        values = values.sum(dim=dims, keepdim=True)
    owner = owner.expand(values.shape).reshape(-1)
    values = values.reshape(-1)
    if owner.numel() and (int(owner.min()) < -1 or int(owner.max()) >= n_units):
        lo, hi = int(owner.min()), int(owner.max())
        raise ValueError(f"{what}: owner values must lie in [-1, {n_units - 1}], got [{lo}, {hi}]")
    return values, owner, multiplicity


def _scatter(values: torch.Tensor, owner: torch.Tensor, n_units: int) -> torch.Tensor:
    """out[u] = sum of values[i] with owner[i] == u (entries with owner -1 dropped)."""
    keep = owner >= 0
    out = torch.zeros(n_units, dtype=values.dtype, device=values.device)
    return out.index_add_(0, owner[keep], values[keep])


def unit_sum(values: torch.Tensor, owner: torch.Tensor, n_units: int) -> torch.Tensor:
    """Per-unit sum of ``values`` (float32), ``owner`` broadcastable to it, -1 entries ignored."""
    flat, own, _ = _reduce_to_owner(values.detach().to(torch.float32), owner, n_units)
    return _scatter(flat, own, n_units)


def unit_count(owner: torch.Tensor, shape: torch.Size, n_units: int) -> torch.Tensor:
    """How many elements of a tensor of ``shape`` each unit owns (int64)."""
    _check_owner(owner, shape, "owner")
    own = owner.to(torch.long).reshape((1,) * (len(shape) - owner.dim()) + tuple(owner.shape))
    multiplicity = 1
    for d in range(len(shape)):
        if own.shape[d] == 1:
            multiplicity *= shape[d]
    own = own.reshape(-1)
    return torch.bincount(own[own >= 0], minlength=n_units)[:n_units] * multiplicity


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


# ------------------------------------------------------------------------------------- weight criteria


def group_norm(members: Sequence[Member], n_units: int, p: float = 2) -> torch.Tensor:
    """(sum over all members' elements owned by the unit of |w|^p)^(1/p): p=1 is L1, p=2 is L2.

    Every role counts (producer rows, consumer columns, norm affine, biases): the DepGraph group norm. An
    element is counted once per member it appears in; units owning no element score 0.
    """
    if not p > 0 or p == float("inf"):
        raise ValueError(f"group_norm: p must be a positive finite number, got {p}")
    total = torch.zeros(n_units, dtype=torch.float32)
    for m in members:
        w = _f32(m.tensor).abs()
        if p != 1:
            w = w.pow(p)
        flat, own, _ = _reduce_to_owner(w, m.owner, n_units, f"member '{m.name}'")
        total = total.to(flat.device) + _scatter(flat, own, n_units)
    return total if p == 1 else total.pow(1.0 / p)


def l1_norm(members: Sequence[Member], n_units: int) -> torch.Tensor:
    """Group L1 norm (Li et al. 2017 filter norms, aggregated over the group as in DepGraph)."""
    return group_norm(members, n_units, p=1)


def l2_norm(members: Sequence[Member], n_units: int) -> torch.Tensor:
    """Group L2 norm: sqrt of the sum of squares of every coupled element a unit owns."""
    return group_norm(members, n_units, p=2)


def _is_batchnorm_weight(m: Member) -> bool:
    """gamma only: the engine tags every per-channel BN tensor (bias, running stats too) with role "norm"."""
    parts = m.name.split(".")
    if len(parts) > 1 and parts[-1].startswith(
        "original"
    ):  # parametrized: "bn.parametrizations.weight.original"
        parts = parts[:-1]
    return (
        m.role == "norm"
        and (m.module_type.startswith("BatchNorm") or m.module_type == "SyncBatchNorm")
        and parts[-1] == "weight"
    )


def bn_scale(members: Sequence[Member], n_units: int) -> torch.Tensor:
    """Sum over the group's BatchNorm weights of |gamma| per unit (network slimming).

    A residual add couples several BatchNorms into one group; their |gamma| are summed.
    """
    bns = [m for m in members if _is_batchnorm_weight(m)]
    if not bns:
        names = ", ".join(f"{m.name} ({m.module_type or '?'})" for m in members) or "no members"
        raise ValueError(
            f"bn_scale needs a BatchNorm weight (role 'norm', affine=True) in the group; it has {names}"
        )
    total = torch.zeros(n_units, dtype=torch.float32)
    for m in bns:
        flat, own, _ = _reduce_to_owner(_f32(m.tensor).abs(), m.owner, n_units, f"member '{m.name}'")
        total = total.to(flat.device) + _scatter(flat, own, n_units)
    return total


def taylor(members: Sequence[Member], grads: Sequence[torch.Tensor | None], n_units: int) -> torch.Tensor:
    """|sum over every element s the unit owns, across members, of w_s * g_s| for one gradient.

    The first-order estimate of the loss change when the whole unit is zeroed (Molchanov et al. 2019 square
    it; |.| ranks identically). ``grads`` is aligned with ``members``; a None gradient skips that member. For
    several calibration batches average the per-batch scores (e.g. with ``calib.stats.RunningMean``) rather
    than the gradients: averaged gradients of a converged model cancel to ~0.
    """
    if len(grads) != len(members):
        raise ValueError(f"taylor: got {len(grads)} gradients for {len(members)} members")
    total = torch.zeros(n_units, dtype=torch.float32)
    used = 0
    for m, g in zip(members, grads):
        if g is None:
            continue
        if g.shape != m.tensor.shape:
            raise ValueError(
                f"taylor: gradient of '{m.name}' has shape {tuple(g.shape)}, its parameter "
                f"{tuple(m.tensor.shape)}"
            )
        wg = _f32(m.tensor) * _f32(g).to(m.tensor.device)
        flat, own, _ = _reduce_to_owner(wg, m.owner, n_units, f"member '{m.name}'")
        total = total.to(flat.device) + _scatter(flat, own, n_units)
        used += 1
    if not used:
        raise ValueError("taylor needs at least one gradient; run a backward pass on calibration data first")
    return total.abs()


def _unit_rows(m: Member, n_units: int) -> torch.Tensor:
    """The elements each unit owns in ``m`` as an (n_units, k) matrix, in the same order for every unit."""
    w = _f32(m.tensor)
    owner = m.owner.to(device=w.device, dtype=torch.long)
    owner = owner.reshape((1,) * (w.dim() - owner.dim()) + tuple(owner.shape))
    varying = [d for d in range(w.dim()) if owner.shape[d] != 1]
    if len(varying) == 1:  # the usual case, units along one dim: select whole slices, no per-element index
        rows, owner = w.movedim(varying[0], 0).reshape(w.shape[varying[0]], -1), owner.reshape(-1)
    else:
        rows, owner = w.reshape(-1, 1), owner.expand(w.shape).reshape(-1)
    if owner.numel() and (int(owner.min()) < -1 or int(owner.max()) >= n_units):
        raise ValueError(f"member '{m.name}': owner values must lie in [-1, {n_units - 1}]")
    keep = owner >= 0
    owner, rows = owner[keep], rows[keep]
    if not rows.numel():
        return rows.new_zeros(n_units, 0)
    counts = torch.bincount(owner, minlength=n_units)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            f"fpgm: producer member '{m.name}' gives units filters of different sizes "
            f"({int(counts.min())}..{int(counts.max())} slices); every unit needs an equally shaped filter"
        )
    order = torch.sort(owner, stable=True).indices  # stable: each unit's slices keep their order
    return rows[order].reshape(n_units, -1)


def fpgm(members: Sequence[Member], n_units: int, chunk: int = 1024) -> torch.Tensor:
    """score_i = sum_j ||f_i - f_j||_2, f_i the unit's filter over all producer ("out") members concatenated.

    Units near the geometric median of the filters are the most replaceable and score lowest. Distances are
    computed ``chunk`` rows at a time so memory stays O(chunk * n_units).
    """
    outs = [m for m in members if m.role == "out"]
    if not outs:
        raise ValueError("fpgm needs the group's producer ('out') weights; this group has none")
    filters = torch.cat([_unit_rows(m, n_units) for m in outs], dim=1)
    scores = torch.empty(n_units, dtype=torch.float32, device=filters.device)
    for start in range(0, n_units, chunk):
        block = filters[start : start + chunk]
        scores[start : start + chunk] = torch.cdist(block, filters, p=2).sum(dim=1)
    return scores


# --------------------------------------------------------------------------------- activation criteria


class ActivationMean:
    """Streaming mean |activation| per unit: ``add_batch(acts)`` per calibration batch, then ``value()``.

    ``owner`` (fixed for the layer) is broadcastable to every batch's activation tensor, e.g. ``(1, C, 1, 1)``
    for conv outputs or ``(D,)`` for ``(..., D)`` transformer hidden states; batches may differ in size.
    Sums are kept in float64, so the value does not depend on how the data were split into batches.
    """

    def __init__(self, n_units: int, owner: torch.Tensor) -> None:
        self.n_units = n_units
        self.owner = owner
        self.reset()

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None  # float64 sums on the device of the first batch
        self._count: torch.Tensor | None = None
        self.batches = 0

    def _stat(self, acts: torch.Tensor) -> torch.Tensor:
        return _f32(acts).abs()

    def add_batch(self, acts: torch.Tensor) -> None:
        flat, own, mult = _reduce_to_owner(self._stat(acts), self.owner, self.n_units, "activations")
        flat = flat.to(torch.float64)
        sums = _scatter(flat, own, self.n_units)
        counts = _scatter(torch.full_like(flat, float(mult)), own, self.n_units)
        if self._sum is None or self._count is None:
            self._sum, self._count = sums, counts
        else:
            self._sum += sums.to(self._sum.device)
            self._count += counts.to(self._count.device)
        self.batches += 1

    def _mean(self) -> torch.Tensor:
        if self._sum is None or self._count is None:
            raise RuntimeError("no batch was added")
        empty = (self._count == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"the activation owner covers no element of units {empty[:8].tolist()}")
        return self._sum / self._count

    def value(self) -> torch.Tensor:
        return self._mean().to(torch.float32)


class APoZ(ActivationMean):
    """Streaming 1 - APoZ per unit: the fraction of non-zero activations (|a| <= ``zero`` counts as zero)."""

    def __init__(self, n_units: int, owner: torch.Tensor, zero: float = 0.0) -> None:
        self.zero = zero
        super().__init__(n_units, owner)

    def _stat(self, acts: torch.Tensor) -> torch.Tensor:
        return (acts.detach().abs() <= self.zero).to(torch.float32)

    def value(self) -> torch.Tensor:
        return (1.0 - self._mean()).to(torch.float32)


def activation_mean(acts: torch.Tensor, n_units: int, owner: torch.Tensor) -> torch.Tensor:
    """Mean |a| over every element of ``acts`` (batch, positions, and features) a unit owns."""
    acc = ActivationMean(n_units, owner)
    acc.add_batch(acts)
    return acc.value()


def apoz(acts: torch.Tensor, n_units: int, owner: torch.Tensor, zero: float = 0.0) -> torch.Tensor:
    """1 - APoZ: 1 minus the fraction of a unit's activations that are zero (post-ReLU outputs, Hu et al.)."""
    acc = APoZ(n_units, owner, zero)
    acc.add_batch(acts)
    return acc.value()


# ------------------------------------------------------------------------------------------- registry


@dataclass
class UnitGroup:
    """What an importance function sees of one coupled group (prunekit.registry.StructuredImportance).

    ``members``: every parameter of the group with the unit each element belongs to (``-1``: outside the
    group); ``grads``: for importance that needs gradients, each member's gradient on one calibration batch
    (aligned with ``members``, ``None`` where a parameter got none); ``generator``: for random draws.
    """

    index: int
    name: str  # the parameter the group was found from, e.g. "layer1.0.conv1.weight"
    units: int
    members: list[Member]
    grads: list[torch.Tensor | None] | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Importance:
    """A registered structured importance (a :class:`prunekit.registry.StructuredImportance`)."""

    score: Callable[[UnitGroup], torch.Tensor] | None  # None for "activations": the accumulator scores
    needs: str = "weights"  # "weights" | "gradients" | "activations"
    accumulator: type | None = None  # needs="activations": accumulator(units, owner).add_batch / value
    reference: str = ""

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise PrunekitError(f"importance needs one of {', '.join(NEEDS)}, got {self.needs!r}")
        if (self.needs == "activations") != (self.accumulator is not None):
            raise PrunekitError("an accumulator is given exactly for importance that needs activations")

    def __call__(self, group: UnitGroup) -> torch.Tensor:
        if self.score is None:
            raise PrunekitError("this importance is computed from activations by its accumulator")
        return self.score(group)


NEEDS = ("weights", "gradients", "activations")


def register_importance(
    name: str,
    needs: str = "weights",
    accumulator: type | None = None,
    reference: str = "",
    replace: bool = False,
) -> Callable[[Callable[[UnitGroup], torch.Tensor]], Importance]:
    """Decorator: register ``fn(group: UnitGroup) -> scores (group.units,)`` as structured importance
    ``name`` (usable as ``prune_model(..., importance=name)``, ``importance: name`` in a recipe and
    ``prunekit structured --importance name``); returns the registered :class:`Importance`."""

    def add(fn: Callable[[UnitGroup], torch.Tensor] | None) -> Importance:
        entry = Importance(fn, needs, accumulator, reference)
        STRUCTURED_IMPORTANCE.register(name, replace=replace)(entry)
        return entry

    return add


@register_importance("l1", reference="Li et al. 2017; Fang et al. 2023")
def _l1(group: UnitGroup) -> torch.Tensor:
    return l1_norm(group.members, group.units)


@register_importance("l2", reference="Fang et al. 2023 (DepGraph)")
def _l2(group: UnitGroup) -> torch.Tensor:
    return l2_norm(group.members, group.units)


@register_importance("bn_scale", reference="Liu et al. 2017")
def _bn_scale(group: UnitGroup) -> torch.Tensor:
    try:
        return bn_scale(group.members, group.units)
    except ValueError:
        log.info("group %d (%s) has no BatchNorm: ranked by its L2 norm instead", group.index, group.name)
        return l2_norm(group.members, group.units)


@register_importance("fpgm", reference="He et al. 2019")
def _fpgm(group: UnitGroup) -> torch.Tensor:
    return fpgm(group.members, group.units)


@register_importance("random", reference="random baseline")
def _random(group: UnitGroup) -> torch.Tensor:
    return random_scores(group.units, group.generator)


@register_importance("taylor", needs="gradients", reference="Molchanov et al. 2019")
def _taylor(group: UnitGroup) -> torch.Tensor:
    return taylor(group.members, group.grads or [], group.units)


register_importance("activation_mean", "activations", ActivationMean, "Polyak & Wolf 2015")(None)
register_importance("apoz", "activations", APoZ, "Hu et al. 2016")(None)
