"""How much to prune where; every allocation is registered in :data:`prunekit.registry.ALLOCATIONS`.

- ``uniform`` (layers, from weight shapes): :func:`uniform_by_shape`, every layer at the target;
- ``erk`` (layers, from weight shapes): :func:`prunekit.allocate.uniform.erk_allocation` (RigL's);
- ``sensitivity`` (layers, measured curves): :func:`prunekit.allocate.sensitivity.sensitivity_allocation`;
- ``owl`` (LLM decoder blocks, from outlier ratios): :func:`prunekit.allocate.owl.owl_sparsities`;
- ``latency`` (structured groups, from timing tables): :func:`prunekit.allocate.latency.prune_for_latency`.

A recipe's prune stage takes any ``layers`` allocation by name (``allocation: erk``): one that works from
weight shapes is called as ``fn(shapes, target) -> {layer: sparsity}``, so your own registers with
``ALLOCATIONS.register("mine")(AllocationMethod("layers", fn))`` or is named ``package.module:attribute``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prunekit.allocate.latency import prune_for_latency
from prunekit.allocate.owl import owl_sparsities
from prunekit.allocate.sensitivity import sensitivity_allocation
from prunekit.allocate.uniform import erk_allocation, uniform_allocation
from prunekit.errors import PrunekitError
from prunekit.registry import ALLOCATIONS

APPLIES_TO = ("layers", "llm-blocks", "structured-groups")
INPUTS = ("shapes", "sensitivity-curves", "outlier-ratios", "latency-tables")


@dataclass(frozen=True)
class AllocationMethod:
    """A registered allocation (a :class:`prunekit.registry.Allocation`)."""

    applies_to: str  # what it allocates: "layers" | "llm-blocks" | "structured-groups"
    fn: Callable[..., Any]  # the pure function
    inputs: str = "shapes"  # what it is computed from (INPUTS); "shapes": fn(shapes, target)
    reference: str = ""

    def __post_init__(self) -> None:
        if self.applies_to not in APPLIES_TO:
            raise PrunekitError(f"applies_to must be one of {', '.join(APPLIES_TO)}, got {self.applies_to!r}")
        if self.inputs not in INPUTS:
            raise PrunekitError(f"inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")


def uniform_by_shape(shapes: Mapping[str, Sequence[int]], target: float) -> dict[str, float]:
    """Every layer at ``target`` (:func:`uniform_allocation` from the weight shapes)."""
    return uniform_allocation({n: math.prod(int(d) for d in s) for n, s in shapes.items()}, target)


for _name, _entry in {
    "uniform": AllocationMethod("layers", uniform_by_shape, "shapes", "every layer at the target"),
    "erk": AllocationMethod("layers", erk_allocation, "shapes", "Evci et al., ICML 2020"),
    "sensitivity": AllocationMethod(
        "layers", sensitivity_allocation, "sensitivity-curves", "Han et al. 2015; Zmora et al. 2019"
    ),
    "owl": AllocationMethod("llm-blocks", owl_sparsities, "outlier-ratios", "Yin et al., ICML 2024"),
    "latency": AllocationMethod(
        "structured-groups", prune_for_latency, "latency-tables", "NetAdapt 2018; HALP 2022"
    ),
}.items():
    ALLOCATIONS.register(_name)(_entry)

__all__ = [
    "APPLIES_TO",
    "INPUTS",
    "AllocationMethod",
    "erk_allocation",
    "owl_sparsities",
    "uniform_allocation",
    "uniform_by_shape",
]
