"""How much to prune where; every allocation is registered in :data:`prunekit.registry.ALLOCATIONS`.

==============  ===================  ===============================================================
name            applies to           function
==============  ===================  ===============================================================
``uniform``     layers               :func:`prunekit.allocate.uniform.uniform_allocation`
``erk``         layers               :func:`prunekit.allocate.uniform.erk_allocation` (RigL)
``sensitivity`` layers               :func:`prunekit.allocate.sensitivity.sensitivity_allocation`
``owl``         LLM decoder blocks   :func:`prunekit.allocate.owl.owl_sparsities` (OWL)
``latency``     structured groups    :func:`prunekit.allocate.latency.prune_for_latency` (knapsack)
==============  ===================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prunekit.allocate.latency import prune_for_latency
from prunekit.allocate.owl import owl_sparsities
from prunekit.allocate.sensitivity import sensitivity_allocation
from prunekit.allocate.uniform import erk_allocation, uniform_allocation
from prunekit.registry import ALLOCATIONS

APPLIES_TO = ("layers", "llm-blocks", "structured-groups")


@dataclass(frozen=True)
class AllocationMethod:
    """A registered allocation (a :class:`prunekit.registry.Allocation`)."""

    applies_to: str  # what it allocates: "layers" | "llm-blocks" | "structured-groups"
    fn: Callable[..., Any]  # the pure function
    reference: str = ""


for _name, _entry in {
    "uniform": AllocationMethod("layers", uniform_allocation, "every layer at the target"),
    "erk": AllocationMethod("layers", erk_allocation, "Evci et al., ICML 2020"),
    "sensitivity": AllocationMethod("layers", sensitivity_allocation, "Han et al. 2015; Zmora et al. 2019"),
    "owl": AllocationMethod("llm-blocks", owl_sparsities, "Yin et al., ICML 2024"),
    "latency": AllocationMethod("structured-groups", prune_for_latency, "NetAdapt 2018; HALP 2022"),
}.items():
    ALLOCATIONS.register(_name)(_entry)

__all__ = ["APPLIES_TO", "AllocationMethod", "erk_allocation", "owl_sparsities", "uniform_allocation"]
