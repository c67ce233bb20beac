"""OWL (Yin et al. 2024): outlier ratio over all scores together, per-block sparsities around the target."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.allocate.owl import outlier_ratio, owl_sparsities
from prunekit.errors import PrunekitError

FAST = settings(max_examples=25, deadline=None)


def test_outlier_ratio_counts_strictly_above_m_times_the_mean_of_all_scores_together():
    a = torch.ones(2, 4)  # 8 scores of 1
    b = torch.tensor([[1.0, 30.0]])
    # together: mean 39/10 = 3.9, 5 * 3.9 = 19.5; only 30 is above -> 1/10
    assert outlier_ratio([a, b], m=5.0) == pytest.approx(0.1, abs=1e-15)
    assert outlier_ratio([b, a], m=5.0) == pytest.approx(0.1, abs=1e-15)
    # each alone has no outlier (mean 1 -> 5; mean 15.5 -> 77.5): the ratio is not a per-tensor average
    assert outlier_ratio([a], m=5.0) == 0.0
    assert outlier_ratio([b], m=5.0) == 0.0
    # strictly greater: mean of [1, 1, 1, 1, 6] is 2, and 6 == 3 * 2 is not an outlier
    c = torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0])
    assert outlier_ratio([c], m=3.0) == 0.0
    assert outlier_ratio([c], m=2.9) == pytest.approx(0.2, abs=1e-15)
    # shapes do not matter, only the scores
    assert outlier_ratio([c.reshape(5, 1)], m=2.9) == outlier_ratio([c], m=2.9)
    with pytest.raises(PrunekitError):
        outlier_ratio([], m=5.0)
    with pytest.raises(PrunekitError):
        outlier_ratio([torch.empty(0)], m=5.0)


_ratios = st.lists(st.integers(0, 1000).map(lambda v: v / 1000), min_size=1, max_size=12)


@st.composite
def _target_and_lambda(draw):
    lam = draw(st.integers(0, 20).map(lambda v: v / 100))
    target = draw(st.integers(0, 95).map(lambda v: v / 100))
    if not (target - lam >= 0 and target + lam < 1):
        target = min(max(target, lam), 0.99 - lam)
    return target, lam


@FAST
@given(ratios=_ratios, tl=_target_and_lambda())
def test_owl_sparsities_mean_spread_and_order(ratios, tl):
    target, lam = tl
    try:
        out = owl_sparsities(ratios, target, lam)
    except PrunekitError:
        # refused only when the reference formula really leaves [0, 1) for these (lopsided) ratios
        r = torch.tensor(ratios, dtype=torch.float64)
        scaled = (r - r.min()) / (r.max() - r.min()) * 2 * lam
        sparsity = target - (scaled - scaled.mean())
        assert float(sparsity.min()) < 0.0 or float(sparsity.max()) >= 1.0
        return
    assert len(out) == len(ratios)
    assert abs(sum(out) / len(out) - target) <= 1e-12
    if max(ratios) == min(ratios):
        assert out == [target] * len(ratios)
        return
    assert abs((max(out) - min(out)) - 2 * lam) <= 1e-12
    # more outliers -> lower sparsity: the order of the sparsities is the reverse of the ratios'
    for i in range(len(ratios)):
        for j in range(len(ratios)):
            if ratios[i] > ratios[j]:
                assert out[i] <= out[j]
            if ratios[i] == ratios[j]:
                assert out[i] == out[j]
    assert out[ratios.index(max(ratios))] == min(out)
    assert out[ratios.index(min(ratios))] == max(out)


def test_owl_sparsities_hand_example():
    # ratios [0.1, 0.2, 0.3] scaled to [0, 2λ] = [0, 0.1, 0.2] (λ = 0.1), mean 0.1;
    # density = scaled - 0.1 + 0.5, sparsity = 1 - density
    out = owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.1)
    assert out == pytest.approx([0.6, 0.5, 0.4], abs=1e-12)
    assert owl_sparsities([0.3, 0.3, 0.3], 0.5, 0.1) == [0.5, 0.5, 0.5]
    assert owl_sparsities([0.7], 0.5, 0.1) == [0.5]
    assert owl_sparsities([0.1, 0.9], 0.5, 0.0) == [0.5, 0.5]


@pytest.mark.parametrize(
    ("target", "lam"), [(0.5, -0.01), (0.7, 0.3), (0.8, 0.25), (0.1, 0.2), (0.0, 0.01), (0.5, float("nan"))]
)
def test_owl_sparsities_rejects_invalid_lambda(target, lam):
    with pytest.raises(PrunekitError):
        owl_sparsities([0.1, 0.2], target, lam)


@pytest.mark.parametrize(
    ("ratios", "target", "lam"),
    [([0.0, 0.0, 0.0, 1.0], 0.1, 0.1), ([1.0, 1.0, 1.0, 1.0, 0.0], 0.85, 0.1)],
)
def test_owl_sparsities_accepted_lambda_gives_valid_sparsities(ratios, target, lam):
    # lopsided ratios push one block beyond target ± λ (up to 2λ(n-1)/n): when that leaves [0, 1) the
    # kernel refuses with a clear error instead of returning an invalid (or clipped, no longer mean-exact) one
    with pytest.raises(PrunekitError, match="smaller --owl-lambda"):
        owl_sparsities(ratios, target, lam)
