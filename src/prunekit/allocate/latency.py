"""Latency-aware structured allocation: per-group keep ratios that meet a latency target measured on this
machine, with the least predicted loss.

The approach follows NetAdapt (Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications", ECCV 2018) -- empirical per-layer latency tables measured on the target device, latency of a
network predicted as the sum of its layers' -- and HALP (Shen et al., "Structural Pruning via
Latency-Saliency Knapsack", NeurIPS 2022) -- the choice of how much to prune per group posed as a knapsack:
least importance lost under a latency budget. Three steps:

1. :func:`measure_tables` (impure, measures): for every prunable group and every keep ratio of a small grid
   (kept counts rounded to ``round_to``, a kernel-friendly multiple such as 8), the *whole model* with only
   that group pruned is timed (batch 1 in the pipeline), p50 of many calls, each variant interleaved with
   the unpruned base in its own pair (``prunekit.analysis.compare_latency``; docs/measuring.md): its
   latency is the base p50 times the pair's ratio of medians. Timing the whole model rather than the
   group's layers alone keeps what pruning a group really changes (the next layer's input channels, the
   BatchNorm, the residual add) and the per-call overheads in the numbers. The same variants give the
   predicted loss: ``loss(model)`` minus the loss of the unpruned model -- the pipeline passes the
   validation cross-entropy (a sensitivity curve, one group pruned alone, no fine-tuning); without data the
   default is the relative output distortion ``||f'(x) - f(x)||^2 / ||f(x)||^2`` on the example inputs
   (smooth, data-free; channel-pruning works such as He et al. 2017 minimise the same reconstruction error).
2. :func:`allocate` (pure: tables in, choices out): with the additive model
   ``latency(choice) = base + sum_g (T_g(r_g) - base)`` and ``loss(choice) = sum_g L_g(r_g)``, an exact
   multiple-choice knapsack by dynamic programming over Pareto-optimal partial solutions (each group adds
   its options to every kept (latency, loss) state; dominated states are dropped). Exact; when the number
   of states would exceed ``max_states`` it thins them on a latency grid and says so.
3. the caller prunes with the chosen ratios (``prune_model(..., ratios=...)``) and measures the final model
   against the dense one: additivity is an assumption, and the measured number is what gets reported.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.analysis.latency import compare_latency
from prunekit.errors import PrunekitError
from prunekit.structured.core import prune_model

log = logging.getLogger(__name__)
DEFAULT_GRID = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Option:
    """One way to prune one group: its ratio, the kept units after rounding, the measured p50 of the whole
    model with only this group pruned (ms) and the predicted loss of doing so."""

    ratio: float
    keep: int
    latency_ms: float
    loss: float


@dataclass
class GroupTable:
    name: str  # the module whose output units the group owns (the key for prune_model's ``ratios``)
    units: int
    options: list[Option]  # options[0] is "not pruned": ratio 0, the base latency, loss 0


@dataclass
class LatencyChoice:
    ratios: dict[str, float]  # group name -> chosen ratio (0: not pruned)
    predicted_ms: float
    predicted_loss: float
    budget_ms: float
    feasible: bool  # whether the additive prediction meets the budget
    exact: bool = True  # False when the states were thinned (see max_states)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict(tables: Sequence[GroupTable], base_ms: float, choice: Mapping[str, int]) -> tuple[float, float]:
    """The additive prediction (latency ms, loss) of choosing option ``choice[name]`` for each group."""
    ms, loss = base_ms, 0.0
    for t in tables:
        o = t.options[choice.get(t.name, 0)]
        ms += o.latency_ms - base_ms
        loss += o.loss
    return ms, loss


def allocate(
    tables: Sequence[GroupTable], base_ms: float, budget_ms: float, max_states: int = 20000
) -> tuple[dict[str, int], LatencyChoice]:
    """The option per group with the least total predicted loss whose additive latency is within
    ``budget_ms``; when no choice fits, the one with the least predicted latency (``feasible=False``).

    Returns ``(choice, allocation)``: ``choice`` maps each group name to the index of its option.
    """
    if not tables:
        raise PrunekitError("latency allocation: no prunable group to allocate")
    if not math.isfinite(budget_ms) or budget_ms <= 0:
        raise PrunekitError(
            f"latency allocation: the budget must be a positive number of ms, got {budget_ms}"
        )
    # a state: (latency delta, loss, choices so far); kept sorted by delta with strictly falling loss
    states: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    exact = True
    for t in tables:
        if not t.options:
            raise PrunekitError(f"latency allocation: group {t.name} has no options")
        grown = [
            (d + o.latency_ms - base_ms, loss + o.loss, picks + (i,))
            for d, loss, picks in states
            for i, o in enumerate(t.options)
        ]
        grown.sort(key=lambda s: (s[0], s[1]))
        states = []
        for s in grown:  # Pareto filter: keep a state only if it loses less than every faster one
            if not states or s[1] < states[-1][1]:
                states.append(s)
        if len(states) > max_states:
            exact = False
            states = _thin(states, max_states)
    slack = 1e-9 * budget_ms  # float sums in another order must not flip a choice at the boundary
    fits = [s for s in states if base_ms + s[0] <= budget_ms + slack]
    # states are sorted by latency with falling loss: the slowest fitting state loses the least
    best = fits[-1] if fits else states[0]
    choice = {t.name: i for t, i in zip(tables, best[2])}
    ratios = {t.name: t.options[i].ratio for t, i in zip(tables, best[2])}
    result = LatencyChoice(ratios, base_ms + best[0], best[1], budget_ms, bool(fits), exact)
    if not exact:
        log.warning("latency allocation: more than %d states; thinned on a latency grid", max_states)
    return choice, result


def _thin(states: list[tuple], limit: int) -> list[tuple]:
    """Keep the least-loss state per cell of an even latency grid (the fastest state always stays)."""
    lo, hi = states[0][0], states[-1][0]
    width = (hi - lo) / limit or 1.0
    kept: dict[int, tuple] = {}
    for s in states:
        cell = int((s[0] - lo) / width)
        if cell not in kept or s[1] < kept[cell][1]:
            kept[cell] = s
    # the fastest partial state always stays: the fastest full choice, hence feasibility, is never lost
    out = sorted({*kept.values(), states[0]}, key=lambda s: (s[0], s[1]))
    filtered = []
    for s in out:
        if not filtered or s[1] < filtered[-1][1]:
            filtered.append(s)
    return filtered


def resolve_budget(target: float | str, dense_ms: float) -> float:
    """``0.6`` -> 60% of the dense p50; ``"2.5ms"`` -> 2.5 ms."""
    if isinstance(target, str):
        text = target.strip().lower()
        if not text.endswith("ms"):
            raise PrunekitError(
                f"target_latency: give a fraction of dense such as 0.6 or '2.5ms', got {target!r}"
            )
        try:
            value = float(text[:-2])
        except ValueError:
            raise PrunekitError(f"target_latency: not a number of ms: {target!r}") from None
        if not value > 0:
            raise PrunekitError(f"target_latency: must be positive, got {target!r}")
        return value
    if isinstance(target, bool) or not 0 < float(target) <= 1:
        raise PrunekitError(
            f"target_latency: a fraction of the dense latency must be in (0, 1], got {target!r}"
        )
    return float(target) * dense_ms


# -- measuring ---------------------------------------------------------------------------------------------


def output_distortion(reference: nn.Module, inputs: torch.Tensor | tuple) -> Callable[[nn.Module], float]:
    """A data-free predicted loss: ``||f'(x) - f(x)||^2 / ||f(x)||^2`` on ``inputs``."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.inference_mode():
        expected = reference.eval()(*args).float()
    scale = float(expected.pow(2).sum()) or 1.0

    @torch.inference_mode()
    def loss(model: nn.Module) -> float:
        return float((model.eval()(*args).float() - expected).pow(2).sum()) / scale

    return loss


@dataclass
class Tables:
    dense_ms: float
    base_ms: float  # the model as prune_model leaves it with ratio 0 (equal to dense unless rounding bites)
    groups: list[GroupTable]
    runs: int
    threads: int
    skipped: list[str] = field(default_factory=list)  # groups whose pruning changed nothing
    passes: int = 1  # every pair was timed this many times; the medians are kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def group_names(result) -> dict[int, str]:
    """Group index -> the first module whose output units it owns (what ``ratios`` patterns match)."""
    names = {}
    for g in result.groups:
        if g.prunable:
            outs = [m.name.rpartition(".")[0] for m in g.members if m.role == "out"]
            if outs:
                names[g.index] = outs[0]
    return names


def paired_ratios(
    pairs: Mapping[str, tuple[nn.Module, nn.Module]], inputs, runs: int, warmup: int, passes: int = 3
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Time every pair ``(a, b)`` interleaved (two calls at a time, ``runs`` calls each), ``passes`` times
    over all pairs; returns the median over passes of b's p50 / a's p50, of a's p50 and of b's p50 (ms)."""

    if passes < 1:
        raise PrunekitError(f"latency passes must be >= 1, got {passes}")
    seen: dict[str, list[tuple[float, float, float]]] = {key: [] for key in pairs}
    for _ in range(passes):
        for key, (a, b) in pairs.items():
            stats = compare_latency(
                {"a": a, "b": b}, inputs, runs=runs, warmup=warmup, blocks=max(1, runs // 2)
            )
            seen[key].append((stats["b"]["p50_ratio"], stats["a"]["p50"], stats["b"]["p50"]))
    med = {k: [statistics.median(v[i] for v in values) for i in range(3)] for k, values in seen.items()}
    return (
        {k: m[0] for k, m in med.items()},
        {k: m[1] for k, m in med.items()},
        {k: m[2] for k, m in med.items()},
    )


def measure_tables(
    model: nn.Module,
    example: torch.Tensor | tuple,
    timing_input: torch.Tensor | tuple | None = None,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    loss: Callable[[nn.Module], float] | None = None,
    runs: int = 60,
    warmup: int = 10,
    passes: int = 3,
    **prune_kwargs,
) -> Tables:
    """Prune a copy of ``model`` one group at a time at every ratio of ``grid`` and measure each copy's
    batch latency (on ``timing_input``, default ``example``) and predicted loss. ``prune_kwargs`` go to
    :func:`prunekit.structured.prune_model` (``importance``, ``round_to``, ``ignore``, ...)."""

    if not grid or any(isinstance(r, bool) or not 0 < r < 1 for r in grid):
        raise PrunekitError(f"latency grid: ratios must be in (0, 1), got {list(grid)}")
    timing_input = example if timing_input is None else timing_input
    dense = copy.deepcopy(model).eval()
    loss = loss or output_distortion(dense, example)
    base_model = copy.deepcopy(model)
    base = prune_model(base_model, example, ratio=0.0, **prune_kwargs)
    names = group_names(base)
    base_removed = {i: len(u) for i, u in base.removed.items()}
    base_loss = loss(base_model)
    variants: dict[str, nn.Module] = {"dense": dense, "base": base_model}
    found: dict[str, list[tuple[float, int, str, float]]] = {}
    units = {names[g.index]: g.units for g in base.groups if g.index in names}
    for index, name in names.items():
        seen = {units[name] - base_removed.get(index, 0)}
        for ratio in sorted(set(grid)):
            candidate = copy.deepcopy(model)
            result = prune_model(candidate, example, ratio=0.0, ratios={name: ratio}, **prune_kwargs)
            keep = units[name] - len(result.removed.get(index, []))
            if keep in seen:  # the rounding mapped this ratio onto a count already measured
                continue
            seen.add(keep)
            key = f"{name}@{ratio:g}"
            variants[key] = candidate.eval()
            found.setdefault(name, []).append((ratio, keep, key, loss(candidate) - base_loss))
    # each variant is timed against the base in its own interleaved pair: a run over dozens of models at
    # once keeps every cache cold and measured all of them ~1.7x slower than they run alone (the final
    # model is measured alone against dense). All pairs are measured in `passes` sweeps, so a burst of
    # load from another process spoils one pass of a few pairs, and the median over passes drops it.
    # Entry = base latency x the median of the pair's ratio of medians.
    pairs = {"base": (dense, base_model)}
    pairs.update({key: (base_model, variants[key]) for name in found for _, _, key, _ in found[name]})
    ratio_of, first, _ = paired_ratios(pairs, timing_input, runs, warmup, passes)
    # only ratios measured within one pair are trusted (absolute p50s moved 2 -> 19 ms between pairs on
    # the shared machine): one absolute scale, the dense p50, and every entry relative to it
    dense_ms = first["base"]
    base_ms = dense_ms * ratio_of["base"]
    tables = []
    for name in names.values():
        if name not in found:
            continue
        options = [Option(0.0, units[name], base_ms, 0.0)]
        options += [Option(r, k, base_ms * ratio_of[key], max(0.0, d)) for r, k, key, d in found[name]]
        tables.append(GroupTable(name, units[name], options))
    skipped = [n for n in names.values() if n not in found]
    threads = torch.get_num_threads()
    return Tables(dense_ms, base_ms, tables, runs, threads, skipped, passes)


def allocate_latency(
    model: nn.Module,
    example: torch.Tensor | tuple,
    target: float | str,
    timing_input: torch.Tensor | tuple | None = None,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    loss: Callable[[nn.Module], float] | None = None,
    runs: int = 60,
    warmup: int = 10,
    passes: int = 3,
    **prune_kwargs,
) -> tuple[Tables, LatencyChoice]:
    """Measure the tables on ``model`` (left unchanged) and choose per-group ratios for ``target``."""
    tables = measure_tables(
        model,
        example,
        timing_input,
        grid=grid,
        loss=loss,
        runs=runs,
        warmup=warmup,
        passes=passes,
        **prune_kwargs,
    )
    budget = resolve_budget(target, tables.dense_ms)
    _, allocation = allocate(tables.groups, tables.base_ms, budget)
    if not allocation.feasible:
        log.warning(
            "latency target %.3f ms cannot be met by the measured options (fastest predicted %.3f ms)",
            budget,
            allocation.predicted_ms,
        )
    return tables, allocation


def closed_loop(
    dense: nn.Module,
    example,
    tables: Tables,
    goal: float,
    timing_input,
    runs: int = 60,
    warmup: int = 10,
    passes: int = 3,
    refine: int = 2,
    **prune_kwargs,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Allocate for ``goal`` (a fraction of the dense p50), prune a copy of ``dense``, measure it; while
    the measured ratio misses, lower the aim by the miss (at least below the missed choice's prediction)
    and retry (up to ``refine`` times). Returns the
    kept attempt (the first that meets the goal, else the fastest measured) and all attempts."""

    attempts, aim, tried = [], goal, set()
    for _ in range(1 + max(0, refine)):
        _, allocation = allocate(tables.groups, tables.base_ms, aim * tables.dense_ms)
        chosen = {name: r for name, r in allocation.ratios.items() if r > 0}
        key = tuple(sorted(chosen.items()))
        if key in tried:  # the lower budget chose the same ratios: nothing left to correct with
            break
        tried.add(key)
        candidate = copy.deepcopy(dense)
        prune_model(candidate, example, ratio=0.0, ratios=chosen, **prune_kwargs)
        ratios, dense_p50, pruned_p50 = paired_ratios(
            {"pruned": (dense, candidate.eval())}, timing_input, runs, warmup, passes
        )
        measured = ratios["pruned"]
        attempts.append(
            {
                "aim_ratio": aim,
                "ratios": allocation.ratios,
                "predicted_ratio": allocation.predicted_ms / tables.dense_ms,
                "predicted_loss": allocation.predicted_loss,
                "predicted_feasible": allocation.feasible,
                "exact": allocation.exact,
                "measured_ratio": measured,
                "dense_ms": dense_p50["pruned"],
                "measured_ms": pruned_p50["pruned"],
            }
        )
        if measured <= goal or not allocation.feasible:
            break
        # lower by the miss, and at least below this choice's prediction, so that the retry is a
        # different, faster-predicted choice (a small miss would otherwise give the same ratios again)
        aim = min(aim - (measured - goal), attempts[-1]["predicted_ratio"] - 1e-9)
        if aim <= 0:
            break
    met = [a for a in attempts if a["measured_ratio"] <= goal]
    return (met[0] if met else min(attempts, key=lambda a: a["measured_ratio"])), attempts


def prune_for_latency(
    model: nn.Module,
    example: torch.Tensor | tuple,
    target: float | str,
    timing_input: torch.Tensor | tuple | None = None,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    loss: Callable[[nn.Module], float] | None = None,
    runs: int = 60,
    warmup: int = 10,
    passes: int = 3,
    refine: int = 2,
    verify: bool = True,
    **prune_kwargs,
):
    """Allocate, prune ``model`` in place with the chosen ratios and measure it against the dense original.

    The additive prediction misses (a convolution's cost is the product of its input and output widths,
    so pruning two neighbouring groups saves less than the sum of what each saves alone): when the
    measured ratio is above the goal, the budget is lowered by the miss and the allocation redone, up to
    ``refine`` times (NetAdapt's closed loop: decide on predictions, check by measurement). The first
    attempt that meets the goal is kept, else the fastest measured one; every attempt is reported.

    Returns ``(result, report)``: the :class:`prunekit.structured.Result` and a JSON-ready dict with the
    tables, the chosen ratios, the predicted and the measured latency.
    """

    timing_input = example if timing_input is None else timing_input
    dense = copy.deepcopy(model).eval()
    tables = measure_tables(
        model,
        example,
        timing_input,
        grid=grid,
        loss=loss,
        runs=runs,
        warmup=warmup,
        passes=passes,
        **prune_kwargs,
    )
    budget = resolve_budget(target, tables.dense_ms)
    goal = budget / tables.dense_ms  # everything is judged by ratios measured within one pair
    best, attempts = closed_loop(
        dense, example, tables, goal, timing_input, runs, warmup, passes, refine, **prune_kwargs
    )
    chosen = {name: r for name, r in best["ratios"].items() if r > 0}
    result = prune_model(model, example, ratio=0.0, ratios=chosen, verify=verify, **prune_kwargs)
    allocation = LatencyChoice(
        best["ratios"],
        best["predicted_ratio"] * tables.dense_ms,
        best["predicted_loss"],
        best["aim_ratio"] * tables.dense_ms,
        best["predicted_feasible"],
        best["exact"],
    )
    measured_ratio, dense_ms, measured = best["measured_ratio"], best["dense_ms"], best["measured_ms"]
    met = measured_ratio <= goal
    report = {
        "target": target,
        "goal_ratio": goal,
        "budget_ms": budget,
        "dense_ms": tables.dense_ms,  # the one absolute scale: the dense p50 measured with the tables
        "measured_ms": measured_ratio * tables.dense_ms,
        "measured_ratio": measured_ratio,  # pruned / dense p50 within one pair, median over passes
        "measured_p50_ms": measured,  # the raw p50s of that final pair (they drift between pairs)
        "dense_p50_ms": dense_ms,
        "predicted_ms": allocation.predicted_ms,
        "predicted_ratio": allocation.predicted_ms / tables.dense_ms,
        "prediction_error": measured_ratio - allocation.predicted_ms / tables.dense_ms,
        "predicted_loss": allocation.predicted_loss,
        "predicted_feasible": allocation.feasible,
        "target_met": met,
        "exact": allocation.exact,
        "ratios": allocation.ratios,
        "kept": {
            t.name: next(o.keep for o in t.options if o.ratio == allocation.ratios[t.name])
            for t in tables.groups
        },
        "tables": tables.to_dict(),
        "attempts": attempts,
        "runs": runs,
        "passes": passes,
        "threads": torch.get_num_threads(),
    }
    return result, report
