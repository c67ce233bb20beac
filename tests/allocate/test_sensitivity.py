"""Per-layer allocation: the global target is met exactly in pruned weights, bounds hold, the greedy is the
optimum for convex curves (brute force), more sensitive layers get less, and a case worked by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from prunekit.allocate.sensitivity import monotone_curve, predicted_drop, sensitivity_allocation
from prunekit.allocate.uniform import erk_allocation, global_count, uniform_allocation
from prunekit.errors import PrunekitError
from prunekit.spec import Unstructured

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def test_by_hand_the_cheapest_weights_go_first():
    curves = {"a": ((0.5, 0.9), (0.0, 0.5)), "b": ((0.5, 0.9), (0.2, 0.6))}
    sizes = {"a": 100, "b": 100}
    # marginal costs per weight: a 0..50 free, b 0..50 0.004, b 50..90 0.01, a 50..90 0.0125
    assert sensitivity_allocation(curves, sizes, 0.5).sparsity == {"a": 0.5, "b": 0.5}
    plan = sensitivity_allocation(curves, sizes, 0.6)  # 120 weights: 50 + 50, then 20 more from b
    assert plan.pruned == {"a": 50, "b": 70}
    assert plan.predicted_drop == pytest.approx({"a": 0.0, "b": 0.4})  # a at 0.7 and b at 0.5 costs 0.45
    plan = sensitivity_allocation(curves, sizes, 0.85)  # 170: both first segments, all of b's 40, 30 of a
    assert plan.pruned == {"a": 80, "b": 90}


def test_monotone_curve_is_a_cumulative_max_through_the_origin():
    s, d = monotone_curve((0.3, 0.1, 0.2), (0.05, -0.01, 0.02))
    assert s.tolist() == [0.0, 0.1, 0.2, 0.3] and d.tolist() == [0.0, 0.0, 0.02, 0.05]
    s, d = monotone_curve((0.1, 0.2, 0.3), (0.04, 0.01, 0.03))
    assert d.tolist() == [0.0, 0.04, 0.04, 0.04]


curve_st = st.lists(st.floats(-0.05, 1.0), min_size=len(GRID), max_size=len(GRID))


@settings(max_examples=60, deadline=None)
@given(
    drops=st.lists(curve_st, min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 5000), min_size=6, max_size=6),
    target=st.floats(0.0, 0.95),
    cap=st.sampled_from([None, 0.9, 0.95]),
)
def test_the_global_target_is_met_exactly_and_bounds_hold(drops, sizes, target, cap):
    names = [f"l{i}" for i in range(len(drops))]
    curves = {n: (GRID, d) for n, d in zip(names, drops)}
    size = {n: s for n, s in zip(names, sizes)}
    hi = 0.95 if cap is None else cap
    if global_count(size, target) > sum(int(np.floor(hi * n + 1e-9)) for n in size.values()):
        with pytest.raises(PrunekitError, match="out of reach"):
            sensitivity_allocation(curves, size, target, max_sparsity=cap)
        return
    plan = sensitivity_allocation(curves, size, target, max_sparsity=cap)
    assert sum(int(round(plan.sparsity[n] * size[n])) for n in names) == int(
        round(target * sum(sizes[: len(names)]))
    )
    assert sum(plan.pruned.values()) == plan.target_pruned
    for n in names:
        assert int(round(plan.sparsity[n] * size[n])) == plan.pruned[n]
        assert 0 <= plan.pruned[n] <= np.floor(hi * size[n] + 1e-9)


def _convex_curve(increments):
    # non-decreasing slopes over the grid steps -> a convex, non-decreasing drop curve through the origin
    widths = np.diff((0.0, *GRID))
    return tuple(np.cumsum(np.sort(increments) * widths).tolist())


@settings(max_examples=60, deadline=None)
@given(
    incs=st.lists(st.lists(st.floats(0.0, 3.0), min_size=10, max_size=10), min_size=2, max_size=3),
    sizes=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    target=st.floats(0.0, 0.9),
)
def test_for_convex_curves_the_greedy_is_the_optimum(incs, sizes, target):
    names = [f"l{i}" for i in range(len(incs))]
    curves = {n: (GRID, _convex_curve(inc)) for n, inc in zip(names, incs)}
    size = dict(zip(names, sizes))
    assume(global_count(size, target) <= sum(int(np.floor(0.95 * n + 1e-9)) for n in size.values()))
    plan = sensitivity_allocation(curves, size, target)
    # brute force over every integer split: the loss of k pruned weights of each layer, tabulated once
    loss = {n: np.interp(np.arange(size[n] + 1) / size[n], *monotone_curve(*curves[n])) for n in names}
    ranges = [range(int(np.floor(0.95 * size[n] + 1e-9)) + 1) for n in names]
    best = min(
        sum(loss[n][k] for n, k in zip(names, ks))
        for ks in itertools.product(*ranges)
        if sum(ks) == plan.target_pruned
    )
    assert predicted_drop(curves, plan.sparsity) == pytest.approx(best, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    inc=st.lists(st.floats(0.0, 2.0), min_size=10, max_size=10),
    factor=st.floats(1.01, 20.0),
    n=st.integers(10, 3000),
    target=st.floats(0.0, 0.95),
)
def test_a_more_sensitive_layer_gets_no_more_sparsity(inc, factor, n, target):
    base = _convex_curve(inc)
    curves = {"fragile": (GRID, [factor * d for d in base]), "robust": (GRID, base)}
    assume(global_count({"a": n, "b": n}, target) <= 2 * int(np.floor(0.95 * n + 1e-9)))
    plan = sensitivity_allocation(curves, {"fragile": n, "robust": n}, target)
    assert plan.pruned["fragile"] <= plan.pruned["robust"] + 1  # one weight: the shared partial step


def test_a_larger_layer_with_the_same_curve_takes_more_of_the_cut():
    curves = {"small": (GRID, [s**2 for s in GRID]), "large": (GRID, [s**2 for s in GRID])}
    plan = sensitivity_allocation(curves, {"small": 100, "large": 10_000}, 0.5)
    assert plan.sparsity["large"] > 0.5 > plan.sparsity["small"]


def test_flat_ties_are_shared_not_given_to_the_first_layer():
    curves = {name: (GRID, [0.0] * 9 + [0.3]) for name in ("a", "b", "c")}
    plan = sensitivity_allocation(curves, {"a": 1000, "b": 1000, "c": 1000}, 0.5)
    assert plan.pruned == {"a": 500, "b": 500, "c": 500}


def test_minimum_sparsity_is_kept_and_counts_towards_the_target():
    curves = {"a": (GRID, [0.0] * 10), "b": (GRID, list(GRID))}
    plan = sensitivity_allocation(curves, {"a": 100, "b": 100}, 0.6, min_sparsity={"b": 0.5})
    assert plan.pruned == {"a": 70, "b": 50}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"target": 0.96}, "out of reach"),
        ({"target": 0.5, "max_sparsity": 0.99}, "beyond its curve"),
        ({"target": 0.1, "min_sparsity": 0.5}, "out of reach"),
        ({"target": 1.0}, "target sparsity must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs, needle):
    curves = {"a": (GRID, [0.1] * 10), "b": (GRID, [0.2] * 10)}
    with pytest.raises(PrunekitError, match=None) as info:
        sensitivity_allocation(curves, {"a": 10, "b": 10}, **kwargs)
    assert needle in str(info.value)


def test_mismatched_layers_and_bad_curves_are_refused():
    with pytest.raises(PrunekitError, match="same layers"):
        sensitivity_allocation({"a": (GRID, [0.0] * 10)}, {"b": 10}, 0.5)
    with pytest.raises(PrunekitError, match="as many drops"):
        sensitivity_allocation({"a": (GRID, [0.0] * 3)}, {"a": 10}, 0.5)
    with pytest.raises(PrunekitError, match="NaN"):
        sensitivity_allocation({"a": (GRID, [float("nan")] * 10)}, {"a": 10}, 0.5)


def test_uniform_allocation_is_the_target_everywhere():
    assert uniform_allocation({"a": 10, "b": 7}, 0.3) == {"a": 0.3, "b": 0.3}
    assert global_count({"a": 10, "b": 7}, 0.3) == 5


# ------------------------------------------------------------------------------------- the Sparsifier side


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))


def _pruned(model, name):
    from prunekit.masking import get_masks

    return int((~get_masks(model)[name]).sum())


def test_the_sparsifier_scales_an_allocation_along_the_schedule_and_lands_on_it():
    from prunekit.schedule import Iterative
    from prunekit.sparsifier import Sparsifier

    model = _mlp()
    sizes = {"0": 600, "2": 1200}
    curves = {"0": (GRID, [s**3 for s in GRID]), "2": (GRID, [0.2 * s**3 for s in GRID])}
    plan = sensitivity_allocation(curves, sizes, 0.7)
    assert plan.sparsity["2"] > 0.7 > plan.sparsity["0"]
    sp = Sparsifier(model, 0.7, schedule=Iterative(0.5), allocation=plan.sparsity)
    sp.prepare()
    rounds = sp.schedule.rounds(0.7)  # 0.5, 0.7
    sp.prune(rounds[0])
    assert _pruned(model, "0") == round(plan.sparsity["0"] * 0.5 / 0.7 * 600)
    assert _pruned(model, "2") == round(plan.sparsity["2"] * 0.5 / 0.7 * 1200)
    sp.prune(rounds[1])
    assert {n: _pruned(model, n) for n in sizes} == plan.pruned
    assert sum(plan.pruned.values()) == round(0.7 * 1800)
    assert sp.layer_specs() == {n: Unstructured(s) for n, s in plan.sparsity.items()}


def test_agp_steps_follow_the_cubic_globally_and_end_on_the_allocation():
    from prunekit.schedule import AGP
    from prunekit.sparsifier import Sparsifier

    model = _mlp()
    plan = {"0": 0.5, "2": 0.85}  # 300 + 1020 of 1800 weights: 1320 = round(0.7333 * 1800)
    sp = Sparsifier(model, 1320 / 1800, schedule=AGP(end=6, every=2), allocation=plan)
    sp.prepare()
    for step in range(7):
        sp.step()
        if step in (2, 4):  # mid-way, each layer is the same fraction of the way to its own target
            fraction = sp.schedule.sparsity_at(step, sp.spec.sparsity) / sp.spec.sparsity
            assert _pruned(model, "0") == round(0.5 * fraction * 600)
            assert _pruned(model, "2") == round(0.85 * fraction * 1200)
    assert (_pruned(model, "0"), _pruned(model, "2")) == (300, 1020)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"spec": "1:2"}, "needs an unstructured pattern"),
        ({"group": "global"}, "it needs group 'layer', got 'global'"),
        ({"overrides": {"0": 0.5}}, "either as overrides or as an allocation"),
        ({"allocation": {"0": 0.5}}, "missing ['2']"),
        ({"allocation": {"0": 0.5, "2": 0.5, "4": 0.5}}, "not targeted ['4']"),
        ({"allocation": {"0": 0.5, "2": 1.0}}, "allocated sparsity of '2' must be in [0, 1)"),
    ],
)
def test_the_sparsifier_refuses_allocations_that_make_no_sense(kwargs, needle):
    from prunekit.sparsifier import Sparsifier

    args = {"spec": 0.5, "allocation": {"0": 0.4, "2": 0.6}, **kwargs}
    with pytest.raises(PrunekitError) as info:
        Sparsifier(_mlp(), args.pop("spec"), **args)
    assert needle in str(info.value)


def test_erk_matches_the_definition_by_hand():
    # densities eps * sum(shape) / prod(shape): (10+20)/200 = 0.15 eps and (20+40)/800 = 0.075 eps;
    # overall density 0.5 of 1000 weights: eps * (0.15 * 200 + 0.075 * 800) = 500 -> eps = 500 / 90
    s = erk_allocation({"a": (10, 20), "b": (40, 20)}, 0.5)
    eps = 500 / 90
    assert s == pytest.approx({"a": 1 - 0.15 * eps, "b": 1 - 0.075 * eps})
    # a tiny layer whose density would exceed 1 is dense, the rest take the whole budget
    s = erk_allocation({"tiny": (2, 2), "big": (100, 100)}, 0.5)
    assert s["tiny"] == 0.0 and s["big"] == pytest.approx(1 - (0.5 * 10004 - 4) / 10000)


@settings(max_examples=50, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 64), min_size=2, max_size=4), min_size=1, max_size=6),
    target=st.floats(0.0, 0.99),
)
def test_erk_meets_the_overall_density(shapes, target):
    named = {f"l{i}": tuple(s) for i, s in enumerate(shapes)}
    s = erk_allocation(named, target)
    sizes = {n: int(np.prod(v)) for n, v in named.items()}
    assert all(0.0 <= v < 1.0 for v in s.values())
    kept = sum((1 - s[n]) * sizes[n] for n in named)
    assert kept == pytest.approx((1 - target) * sum(sizes.values()), rel=1e-9)
