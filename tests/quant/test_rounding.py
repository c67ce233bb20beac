"""The one INT8 arithmetic (prunekit.quant.rounding) against its definitions: the rounding shift is
round-half-to-even of an exact rational, the multipliers approximate their real values within their
stated bounds, and the scalar, NumPy and torch forms compute the same integers."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.quant.rounding import (
    BIAS_LIMIT,
    add_multipliers,
    layer_constants,
    multiplier,
    requantize,
    requantize_np,
    requantize_value,
    rshift_round,
)


def half_even(value: Fraction) -> int:
    """The definition: the nearest integer, ties to the even one."""
    low = math.floor(value)
    rest = value - low
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and low % 2):
        return low + 1
    return low


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**62), 2**62), st.integers(1, 62))
def test_rshift_round_is_round_half_to_even(y, sh):
    want = half_even(Fraction(y, 2**sh))
    assert rshift_round(y, sh) == want
    assert int(rshift_round(np.array([y], dtype=np.int64), np.int64(sh))[0]) == want
    assert int(rshift_round(torch.tensor([y], dtype=torch.int64), sh)[0]) == want


def test_rshift_round_ties_go_to_even():
    ys = [1, 3, 5, -1, -3, -5, 2, 6]  # / 2: 0.5 1.5 2.5 -0.5 -1.5 -2.5 1 3
    assert [rshift_round(y, 1) for y in ys] == [0, 2, 2, 0, -2, -2, 1, 3]
    assert [int(v) for v in torch.round(torch.tensor(ys) / 2)] == [0, 2, 2, 0, -2, -2, 1, 3]  # as torch


@settings(max_examples=200, deadline=None)
@given(st.floats(2**-40, 2**29, allow_nan=False), st.integers(-(2**31) + 1, 2**31 - 1))
def test_multiplier_approximates_the_real_value(m, x):
    big, sh = multiplier(m)
    assert 0 < big < 2**31 and 1 <= sh <= 62
    if m >= 2**-31:  # full precision: M in [2**30, 2**31), relative error below 2**-31
        assert big >= 2**30 and abs(Fraction(big, 2**sh) - Fraction(m)) <= Fraction(m) * Fraction(1, 2**31)
    # the int64 product and the rounding half stay inside int64 for any int32 accumulator plus bias
    assert (abs(x) + BIAS_LIMIT) * big + 2 ** (sh - 1) < 2**63


def test_multiplier_edges():
    assert multiplier(1.0) == (2**30, 30)
    assert multiplier(0.0) == (0, 1)
    assert multiplier(2.0**40) == (2**31 - 1, 1)  # saturates (its outputs saturate anyway)
    ma, mb, sh = add_multipliers(0.5, 0.25)
    assert (Fraction(ma, 2**sh), Fraction(mb, 2**sh)) == (Fraction(1, 2), Fraction(1, 4))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(-(2**31) + 1, 2**31 - 1), min_size=1, max_size=20),
    st.floats(1e-6, 10.0),
    st.sampled_from([(-127, 127), (0, 127), (-(2**31), 2**31 - 1)]),
)
def test_scalar_numpy_and_torch_requantize_agree(values, m, bounds):
    big, sh = multiplier(m)
    lo, hi = bounds
    want = [requantize_value(v, big, sh, lo, hi) for v in values]
    assert requantize_np(np.array(values), big, sh, lo, hi).tolist() == want
    assert requantize(torch.tensor(values), big, sh, lo, hi).tolist() == want
    # and it is the rounded real product, up to the multiplier's own error
    for v, q in zip(values, want):
        exact = Fraction(v) * Fraction(big, 2**sh)
        assert q == min(hi, max(lo, half_even(exact)))


def test_layer_constants_put_the_bias_on_the_accumulator_grid():
    act, ws = torch.tensor(0.02), torch.tensor([0.01, 0.003, 1.0])
    bias = torch.tensor([0.5, -1.25, 1e9])
    bias_q, mult, shift = layer_constants(act, ws, bias, torch.tensor(0.1))
    prod = (act * ws).double()  # one float32 product, then exact
    assert bias_q[:2].tolist() == [round(0.5 / float(prod[0])), round(-1.25 / float(prod[1]))]
    assert int(bias_q[2]) == BIAS_LIMIT  # clamped so every sum stays inside int64
    for p, big, sh in zip(prod.tolist(), mult.tolist(), shift.tolist()):
        assert abs(big / 2**sh - p / float(torch.tensor(0.1))) <= p / 0.1 * 2**-30
