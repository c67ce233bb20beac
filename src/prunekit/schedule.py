"""When to prune: sparsity as a pure function of the round or step.

* one-shot: the target at once;
* iterative geometric: each round removes ``rate`` of the weights that remain, so after round r the
  sparsity is ``1 - (1 - rate)^r``, capped at the target (the last round lands exactly on it)
  (Han et al. 2015; Frankle & Carbin 2019);
* AGP, gradual cubic (Zhu & Gupta, "To prune, or not to prune", 2017):
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` for ``t0 <= t <= t0 + n * dt``, pruning
  every ``dt`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunekit.errors import PrunekitError, unknown_name
from prunekit.spec import check_sparsity

SCHEDULE_TYPES = ("one-shot", "iterative", "agp")


def geometric_rounds(target: float, rate: float) -> list[float]:
    """Sparsity after each round of removing ``rate`` of the remaining weights, ending exactly at target."""
    target = check_sparsity(target, "target sparsity")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
        raise PrunekitError(f"rate must be a fraction in (0, 1), got {rate!r}")
    if target == 0.0:
        return [0.0]
    rounds = math.ceil(math.log(1.0 - target) / math.log(1.0 - rate) - 1e-9)
    return [min(target, 1.0 - (1.0 - rate) ** r) for r in range(1, rounds)] + [target]


def agp_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's cubic schedule; constant ``initial`` before ``start`` and ``final`` after ``end``."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class OneShot:
    """Prune to the target once."""

    def rounds(self, target: float) -> list[float]:
        return [check_sparsity(target, "target sparsity")]


@dataclass(frozen=True)
class Iterative:
    """Prune ``rate`` of the remaining weights per round (fine-tuning in between)."""

    rate: float = 0.2

    def __post_init__(self) -> None:
        geometric_rounds(0.5, self.rate)  # validates the rate

    def rounds(self, target: float) -> list[float]:
        return geometric_rounds(target, self.rate)


@dataclass(frozen=True)
class AGP:
    """Gradual cubic schedule over optimizer steps: prune every ``every`` steps from ``start`` to ``end``."""

    end: int
    start: int = 0
    every: int = 100
    initial: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.initial, "initial sparsity")
        for field in ("start", "end", "every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PrunekitError(f"AGP {field} must be a non-negative integer, got {value!r}")
        if self.every < 1 or self.end <= self.start:
            raise PrunekitError(
                f"AGP needs every >= 1 and end > start, got every={self.every}, "
                f"start={self.start}, end={self.end}"
            )

    def is_pruning_step(self, step: int) -> bool:
        return self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)

    def sparsity_at(self, step: int, final: float) -> float:
        return agp_sparsity(step, self.initial, final, self.start, self.end)

    def rounds(self, target: float) -> list[float]:
        steps = [*range(self.start, self.end, self.every), self.end]
        return [self.sparsity_at(s, target) for s in steps]


Schedule = OneShot | Iterative | AGP


def make_schedule(kind: str, **kwargs) -> Schedule:
    builders = {"one-shot": OneShot, "iterative": Iterative, "agp": AGP}
    if kind not in builders:
        raise unknown_name("schedule", kind, builders)
    return builders[kind](**kwargs)
