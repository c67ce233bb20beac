"""Pruning schedules: geometric rounds and Zhu & Gupta's cubic AGP, as pure functions of the round/step."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import PrunekitError
from prunekit.schedule import AGP, Iterative, OneShot, agp_sparsity, geometric_rounds, make_schedule

targets = st.floats(0.05, 0.95)
rates = st.floats(0.05, 0.9)


# -- geometric rounds --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(target=targets, rate=rates)
def test_geometric_rounds_increase_to_exactly_the_target(target, rate):
    rounds = geometric_rounds(target, rate)
    assert rounds[-1] == target
    assert all(0.0 < s < 1.0 for s in rounds)
    assert all(a < b for a, b in zip(rounds, rounds[1:], strict=False))
    # as few rounds as possible: one fewer full round would not reach the target
    assert len(rounds) == max(1, math.ceil(math.log(1 - target) / math.log(1 - rate) - 1e-9))


@settings(max_examples=200, deadline=None)
@given(target=targets, rate=rates)
def test_each_round_removes_rate_of_the_remaining(target, rate):
    rounds = geometric_rounds(target, rate)
    remaining = [1.0] + [1.0 - s for s in rounds]
    removed = [1.0 - after / before for before, after in zip(remaining, remaining[1:], strict=False)]
    for fraction in removed[:-1]:
        assert fraction == pytest.approx(rate, rel=1e-9, abs=1e-12)
    # the last round lands on the target: it removes at most `rate`, and something
    assert 0.0 < removed[-1] <= rate + 1e-12


def test_geometric_rounds_hand_checked():
    assert geometric_rounds(0.5, 0.5) == [0.5]
    assert geometric_rounds(0.75, 0.5) == pytest.approx([0.5, 0.75])
    assert geometric_rounds(0.8, 0.5) == pytest.approx([0.5, 0.75, 0.8])
    assert geometric_rounds(0.1, 0.2) == [0.1]
    assert geometric_rounds(0.0, 0.2) == [0.0]
    assert geometric_rounds(0.36, 0.2) == pytest.approx([0.2, 0.36])


@pytest.mark.parametrize("rate", [0, 0.0, 1, 1.0, -0.1, 1.5, True, "0.2", None, float("nan")])
def test_bad_rate_raises(rate):
    with pytest.raises(PrunekitError, match="rate"):
        geometric_rounds(0.5, rate)
    with pytest.raises(PrunekitError, match="rate"):
        Iterative(rate=rate)


@pytest.mark.parametrize("target", [1.0, -0.1, 2, float("nan"), float("inf"), "0.5", None, True])
def test_bad_target_raises(target):
    with pytest.raises(PrunekitError, match="target sparsity"):
        geometric_rounds(target, 0.2)


def test_iterative_and_one_shot_rounds():
    assert Iterative(0.5).rounds(0.75) == pytest.approx([0.5, 0.75])
    assert OneShot().rounds(0.7) == [0.7]
    with pytest.raises(PrunekitError):
        OneShot().rounds(1.0)


# -- AGP ---------------------------------------------------------------------------------------------------


def test_agp_hand_checked_step():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3: half way from 0 to 0.8 -> 0.8 - 0.8 / 8 = 0.7
    assert agp_sparsity(50, 0.0, 0.8, 0, 100) == pytest.approx(0.7)
    assert agp_sparsity(25, 0.1, 0.9, 0, 100) == pytest.approx(0.9 - 0.8 * 0.75**3)
    agp = AGP(start=10, end=110, every=10)
    assert agp.sparsity_at(60, 0.8) == pytest.approx(0.7)


@settings(max_examples=100, deadline=None)
@given(
    start=st.integers(0, 1000),
    length=st.integers(1, 1000),
    initial=st.floats(0.0, 0.5),
    final=st.floats(0.5, 0.99),
)
def test_agp_starts_at_initial_ends_at_final_and_is_monotone(start, length, initial, final):
    end = start + length
    assert agp_sparsity(start, initial, final, start, end) == initial
    assert agp_sparsity(max(0, start - 5), initial, final, start, end) == initial
    assert agp_sparsity(end, initial, final, start, end) == final
    for after in (end + 1, end + 1000):
        assert agp_sparsity(after, initial, final, start, end) == final
    steps = range(max(0, start - 3), end + 4, max(1, length // 50))
    values = [agp_sparsity(t, initial, final, start, end) for t in steps]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert all(initial <= v <= final for v in values)


@settings(max_examples=50, deadline=None)
@given(
    start=st.integers(0, 100),
    length=st.integers(1, 300),
    every=st.integers(1, 50),
    final=st.floats(0.1, 0.95),
)
def test_agp_pruning_steps_cover_start_to_end(start, length, every, final):
    agp = AGP(end=start + length, start=start, every=every)
    steps = [t for t in range(0, start + length + 10) if agp.is_pruning_step(t)]
    assert steps[0] == start and steps[-1] == agp.end
    assert all(b - a <= every for a, b in zip(steps, steps[1:], strict=False))
    rounds = agp.rounds(final)
    assert len(rounds) == len(steps)
    assert rounds[-1] == final
    assert rounds == [agp.sparsity_at(t, final) for t in steps]


@pytest.mark.parametrize(
    "fields",
    [
        {"end": 0},
        {"end": 10, "start": 10},
        {"end": 10, "start": 20},
        {"end": 10, "every": 0},
        {"end": -5},
        {"end": 10, "start": -1},
        {"end": 10.5},
        {"end": True},
        {"end": 10, "every": 2.0},
        {"end": 10, "initial": 1.0},
        {"end": 10, "initial": -0.1},
    ],
)
def test_bad_agp_fields_raise(fields):
    with pytest.raises(PrunekitError):
        AGP(**fields)


def test_unknown_schedule_name_raises_with_did_you_mean():
    with pytest.raises(PrunekitError, match="did you mean 'agp'"):
        make_schedule("agb", end=10)
    with pytest.raises(PrunekitError, match="iterative"):
        make_schedule("iterativ")
    assert make_schedule("agp", end=10, every=5) == AGP(end=10, every=5)
    assert make_schedule("iterative", rate=0.3) == Iterative(0.3)
    assert make_schedule("one-shot") == OneShot()
