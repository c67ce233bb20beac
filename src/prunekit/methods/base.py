"""How a one-shot LLM method is registered: its layer function and the input statistic it needs.

    @register_llm_method("mine", statistic="sq_norm")
    def mine(weight, sq_norm, spec, config):      # (out, in) float32 weight -> new weight, zeros where pruned
        keep = keep_lowest_removed(weight.abs() * sq_norm.sqrt(), spec, "row")
        return weight.masked_fill(~keep, 0)

after which ``prune_llm(..., LLMPruneConfig("mine", Unstructured(0.5)))`` uses it once the module that
defines it is imported, and ``prunekit llm prune --method mypkg.module:mine`` from the shell (the
reference imports the module). The protocol is :class:`prunekit.registry.LLMMethod`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.registry import LLM_METHODS

# what the block runner (prunekit.calib.sequential) can gather about a layer's input
STATISTICS = (None, "sq_norm", "gram")
LayerFn = Callable[[torch.Tensor, "torch.Tensor | None", Any, Any], torch.Tensor]


@dataclass(frozen=True)
class LayerMethod:
    """A one-shot method as the registry holds it (a :class:`prunekit.registry.LLMMethod`)."""

    prune: LayerFn  # (weight (out, in) float32, statistic or None, spec, LLMPruneConfig) -> new weight
    statistic: str | None = None  # None | "sq_norm" | "gram"
    reference: str = ""  # the paper

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise PrunekitError(f"statistic must be one of None, 'sq_norm', 'gram', got {self.statistic!r}")

    def __call__(self, weight: torch.Tensor, statistic, spec, config) -> torch.Tensor:
        return self.prune(weight, statistic, spec, config)


def register_llm_method(
    name: str, statistic: str | None = None, reference: str = "", replace: bool = False
) -> Callable[[LayerFn], LayerMethod]:
    """Decorator: register ``fn(weight, statistic, spec, config) -> new weight`` as LLM method ``name``;
    returns the registered :class:`LayerMethod` (callable like ``fn``)."""

    def add(fn: LayerFn) -> LayerMethod:
        method = LayerMethod(fn, statistic, reference or (fn.__doc__ or "").strip().split("\n")[0])
        LLM_METHODS.register(name, replace=replace)(method)
        return method

    return add
