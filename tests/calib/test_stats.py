"""Streaming float32 statistics (prunekit.calib.stats) against their definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.calib.stats import RunningGram

FAST = settings(max_examples=25, deadline=None)


def test_running_gram_equals_xtx_over_n_of_all_batches():
    torch.manual_seed(0)
    batches = [torch.randn(1, 6), torch.randn(7, 6) * 3, torch.randn(32, 6) + 1, torch.randn(2, 5, 6)]
    gram = RunningGram()
    for b in batches:
        gram.add_batch(b)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    assert gram.count == x.shape[0] == 50
    reference = x.T @ x / x.shape[0]
    value = gram.value()
    assert value.dtype == torch.float32 and value.shape == (6, 6)
    assert torch.allclose(value.double(), reference, rtol=1e-5, atol=1e-5)
    # the order of the batches does not matter
    other = RunningGram()
    for b in reversed(batches):
        other.add_batch(b)
    assert torch.allclose(other.value().double(), reference, rtol=1e-5, atol=1e-5)
    gram.reset()
    assert gram.count == 0
    with pytest.raises(RuntimeError):
        gram.value()


@FAST
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_running_gram_any_batch_sizes(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, 5, generator=g) * 2 for n in sizes]
    gram = RunningGram()
    for b in batches:
        gram.add_batch(b)
    x = torch.cat(batches).double()
    assert torch.allclose(gram.value().double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
