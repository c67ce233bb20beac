"""The training-time lifecycle: ``prepare -> prune / step -> squash``.

    sparsifier = Sparsifier(model, "0.7", criterion="magnitude", group="global")
    sparsifier.prepare()                 # all-ones masks as parametrizations
    sparsifier.prune()                   # one shot to the spec's sparsity (or prune(0.36) for a round)
    for batch in loader:                 # your own loop ...
        loss.backward(); optimizer.step()
        sparsifier.step()                # ... one call per optimizer step (AGP, movement)
    sparsifier.squash()                  # zeros made permanent, plain modules again

Data-driven criteria (taylor, obd, wanda) take calibration batches in ``prune(batches=..., loss_fn=...)``.

``allocation={layer: sparsity}`` (from :mod:`prunekit.allocate.sensitivity`) gives every targeted layer its
own final sparsity; the spec's sparsity is then the global target. A round at sparsity ``s`` of a schedule
(iterative, AGP) prunes each layer to ``s_l * s / target``: every layer is the same fraction of the way to
its own target, so the global sparsity follows the schedule and the last round lands on each ``s_l`` exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from prunekit.criteria.base import Batch, LossFn, make_criterion
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks, get_masks, mask_of, squash
from prunekit.schedule import AGP, OneShot, Schedule
from prunekit.select import check_group, select_masks
from prunekit.spec import NM, Block, Spec, Unstructured, check_sparsity, parse
from prunekit.targets import Targets, resolve


def _at_sparsity(spec: Spec, sparsity: float) -> Spec:
    return spec if isinstance(spec, NM) else replace(spec, sparsity=sparsity)


class Sparsifier:
    """Masks a model's targeted layers and keeps them pruned through training."""

    def __init__(
        self,
        model: nn.Module,
        spec: Spec | str | float | dict,
        *,
        criterion: str = "magnitude",
        group: str | None = None,
        targets: Targets | None = None,
        overrides: Mapping[str, Spec | str | float] | None = None,
        schedule: Schedule | None = None,
        seed: int = 0,
        allocation: Mapping[str, float] | None = None,
    ) -> None:
        self.model = model
        self.spec = parse(spec)
        self.criterion_name = criterion
        self.criterion = make_criterion(criterion, seed=seed)
        self.group = group or self.criterion.default_group
        check_group(self.group)
        self.targets = targets or Targets()
        # layers of the default targets the pattern cannot apply to, with the reason (left dense)
        self.skipped: dict[str, str] = {}
        self.specs = resolve(model, self.spec, self.targets, overrides, skipped=self.skipped)
        self.overridden = {name for name, s in self.specs.items() if s != self.spec}
        self.allocation = None if allocation is None else self._allocation(allocation, overrides)
        if self.group == "row" and any(isinstance(s, Block) for s in self.specs.values()):
            raise PrunekitError("block patterns compare within a layer or globally, not per row")
        self.schedule = schedule or OneShot()
        agp = isinstance(self.schedule, AGP) and not isinstance(self.spec, NM)
        if agp and self.schedule.initial > self.spec.sparsity:
            raise PrunekitError(f"AGP initial sparsity {self.schedule.initial} exceeds the final {self.spec}")
        self.step_count = 0
        self._started = False
        self.layers = {name: model.get_submodule(name) for name in self.specs}

    def _allocation(
        self, allocation: Mapping[str, float], overrides: Mapping[str, object] | None
    ) -> dict[str, float]:
        if not isinstance(self.spec, Unstructured):
            raise PrunekitError(f"a per-layer allocation needs an unstructured pattern, got {self.spec}")
        if self.group != "layer":
            raise PrunekitError(
                f"a per-layer allocation sets each layer's sparsity, so weights compete within their layer: "
                f"it needs group 'layer', got '{self.group}'"
            )
        if overrides:
            raise PrunekitError("give per-layer sparsities either as overrides or as an allocation, not both")
        missing, unknown = set(self.specs) - set(allocation), set(allocation) - set(self.specs)
        if missing or unknown:
            raise PrunekitError(
                f"the allocation must name exactly the targeted layers; missing {sorted(missing)}, "
                f"not targeted {sorted(unknown)}"
            )
        chosen = {n: check_sparsity(allocation[n], f"allocated sparsity of '{n}'") for n in self.specs}
        self.specs = {n: Unstructured(s) for n, s in chosen.items()}
        self.overridden = set()
        return chosen

    def _allocated(self, name: str, sparsity: float) -> float:
        """Layer ``name``'s sparsity in a round at global ``sparsity`` (exactly its own at the target)."""
        final, target = self.allocation[name], self.spec.sparsity
        if sparsity >= target or target == 0.0:
            return final
        return min(final, final * sparsity / target)

    # -- lifecycle -----------------------------------------------------------------------------------
    def prepare(self) -> Sparsifier:
        """Attach all-ones masks (existing masks are kept)."""
        fresh = {
            n: torch.ones(m.weight.shape, dtype=torch.bool)
            for n, m in self.layers.items()
            if mask_of(m) is None
        }
        apply_masks(self.model, fresh)
        if not self._started:
            self.criterion.start(self.layers)
            self._started = True
        return self

    def prune(
        self,
        sparsity: float | None = None,
        batches: Iterable[Batch] | None = None,
        loss_fn: LossFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """Recompute masks at ``sparsity`` (default: the spec's). Pruned weights never come back.

        An N:M spec fixes its own sparsity (1 - N/M): giving one is an error, not silently ignored.
        """
        if sparsity is not None:
            if isinstance(self.spec, NM):
                raise PrunekitError(
                    f"the N:M pattern {self.spec} fixes the sparsity at {self.spec.sparsity:.0%}: "
                    "call prune() without a sparsity"
                )
            sparsity = check_sparsity(sparsity)
        self.prepare()
        if self.criterion.needs in ("gradients", "activations"):
            if batches is None:
                raise PrunekitError(f"criterion '{self.criterion_name}' needs calibration batches")
            self.criterion.collect(self.model, self.layers, batches, loss_fn)
        specs = dict(self.specs) if sparsity is None else self.layer_specs(sparsity)
        existing = get_masks(self.model)
        scores = {name: (lambda n=name: self.criterion.scores(n, self.layers[n])) for name in self.layers}
        masks = select_masks(scores, specs, self.group, {n: existing[n] for n in self.layers})
        apply_masks(self.model, masks)
        return masks

    def step(self, batches: Iterable[Batch] | None = None, loss_fn: LossFn | None = None) -> None:
        """Call once after each optimizer step: feeds movement scores and applies AGP pruning steps."""
        self.criterion.on_step(self.layers)
        if isinstance(self.schedule, AGP) and self.schedule.is_pruning_step(self.step_count):
            fixed = isinstance(self.spec, NM)  # N:M has no gradual path: its layers are pruned at `start`
            target = None if fixed else self.schedule.sparsity_at(self.step_count, self.spec.sparsity)
            self.prune(target, batches, loss_fn)
        self.step_count += 1

    def squash(self) -> nn.Module:
        """Make the zeros permanent and return a model of plain modules."""
        return squash(self.model)

    # -- state -----------------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        return {n: m for n, m in get_masks(self.model).items() if n in self.layers}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "masks": self.masks()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step"])
        apply_masks(self.model, state["masks"])

    def layer_specs(self, sparsity: float | None = None) -> dict[str, Spec]:
        """The spec each layer was pruned with (at ``sparsity`` for the non-overridden ones)."""
        if sparsity is None:
            return dict(self.specs)
        if self.allocation is not None:
            return {n: Unstructured(self._allocated(n, sparsity)) for n in self.specs}
        return {n: s if n in self.overridden else _at_sparsity(s, sparsity) for n, s in self.specs.items()}


__all__ = ["Sparsifier", "Unstructured", "NM", "Block"]
