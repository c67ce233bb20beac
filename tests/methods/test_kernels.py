"""The one-shot LLM kernels against the papers' definitions, on cases small enough to check by hand.

* Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row (or N of every M);
* magnitude (Han et al. 2015): exactly round(s * n) smallest |w| per layer or per row, ties by position;
* SparseGPT (Frantar & Alistarh 2023): OBS compensation in closed form, exact per-block counts, N:M groups,
  lower reconstruction error than magnitude and Wanda.

(OWL's tests are in tests/allocate/test_owl.py, the running statistics' in tests/calib/test_stats.py.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.calib.stats import RunningSqNorm
from prunekit.errors import PrunekitError
from prunekit.llm.prune import LLMPruneConfig
from prunekit.methods import magnitude_mask, sparsegpt_prune, wanda_mask
from prunekit.methods import sparsegpt as sparsegpt_module
from prunekit.methods.sparsegpt import dampened_hessian, inverse_hessian_factor
from prunekit.spec import NM, Block, Unstructured

FAST = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------------------- helpers


def _groups_keep_top(keep: torch.Tensor, scores: torch.Tensor, n: int, m: int) -> None:
    """Every group of ``m`` consecutive inputs of every row keeps exactly its ``n`` highest scores."""
    rows, cols = scores.shape
    k = keep.reshape(rows, cols // m, m)
    s = scores.reshape(rows, cols // m, m)
    assert bool((k.sum(dim=-1) == n).all())
    top = torch.zeros_like(k)
    top.scatter_(-1, s.topk(n, dim=-1).indices, True)
    assert torch.equal(k, top)


def _layer_data(seed: int, rows: int = 16, cols: int = 64, tokens: int = 256):
    """A random layer and calibration inputs shaped like LLM activations: strongly correlated features (a
    rank-8 signal plus noise) with per-feature scales spread over one order of magnitude."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.5, cols)[torch.randperm(cols, generator=g)]
    signal = torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g) / 8**0.5
    x = (signal + 0.3 * torch.randn(tokens, cols, generator=g)) * scales
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _recon_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X W^T - X Ŵ^T||_F^2 in float64."""
    x, w, w_hat = x.double(), w.double(), w_hat.double()
    return float((x @ w.T - x @ w_hat.T).pow(2).sum())


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return (x.double().T @ x.double() / x.shape[0]).float()


# ----------------------------------------------------------------------------------------------------- Wanda

# 4 tokens x 4 input features; mean over tokens of x_j^2 is [1, 4, 0.25, 9], so sqrt -> [1, 2, 0.5, 3] and the
# paper's ||X_j||_2 (a sum over tokens) is twice that: [2, 4, 1, 6]. The common factor changes no ranking.
X_HAND = torch.tensor(
    [
        [1.0, 2.0, 0.5, 3.0],
        [-1.0, 2.0, 0.5, 3.0],
        [1.0, -2.0, 0.5, 3.0],
        [-1.0, 2.0, -0.5, 3.0],
    ]
)
W_HAND = torch.tensor(
    [
        [4.0, 1.0, 3.0, 1.0],  # |W|*||X|| = 2*[4, 2, 1.5, 3]  -> keep inputs 0, 3 (magnitude: 0, 2)
        [-2.5, 0.5, 6.0, -0.9],  # |W|*||X|| = 2*[2.5, 1, 3, 2.7] -> keep inputs 2, 3 (magnitude: 0, 2)
    ]
)


def test_wanda_hand_example_matches_paper_score_and_differs_from_magnitude():
    sq = X_HAND.pow(2).mean(dim=0)
    assert torch.equal(sq, torch.tensor([1.0, 4.0, 0.25, 9.0]))
    stat = RunningSqNorm()
    stat.add_batch(X_HAND)
    assert stat.mean.count == 4 and torch.equal(stat.value(), sq)
    halves = RunningSqNorm()  # the same mean from two batches of the tokens
    halves.add_batch(X_HAND[:1])
    halves.add_batch(X_HAND[1:])
    assert halves.mean.count == 4 and torch.allclose(halves.value(), sq)

    paper = W_HAND.abs() * X_HAND.norm(dim=0)  # Sun et al.: |W_ij| * ||X_j||_2 over all tokens
    assert torch.allclose(paper, torch.tensor([[8.0, 4.0, 3.0, 6.0], [5.0, 2.0, 6.0, 5.4]]))

    keep = wanda_mask(W_HAND, sq, Unstructured(0.5))
    expected = torch.tensor([[True, False, False, True], [False, False, True, True]])
    assert torch.equal(keep, expected)
    # each row keeps exactly its 2 highest paper scores
    assert torch.equal(keep, torch.zeros_like(keep).scatter_(1, paper.topk(2, dim=1).indices, True))

    magnitude = torch.tensor([[True, False, True, False], [True, False, True, False]])
    assert torch.equal(magnitude_mask(W_HAND, Unstructured(0.5), "row"), magnitude)
    assert torch.equal(magnitude_mask(W_HAND, Unstructured(0.5), "layer"), magnitude)
    assert not torch.equal(keep, magnitude)

    # one row is one 2:4 group here: the same keep-mask
    assert torch.equal(wanda_mask(W_HAND, sq, NM(2, 4)), expected)


def test_wanda_is_invariant_to_a_common_scale_of_the_norms():
    sq = X_HAND.pow(2).mean(dim=0)
    keep = wanda_mask(W_HAND, sq, Unstructured(0.5))
    assert torch.equal(wanda_mask(W_HAND, sq * 4.0, Unstructured(0.5)), keep)  # sum instead of mean
    assert torch.equal(wanda_mask(-W_HAND, sq, Unstructured(0.5)), keep)  # |W|: the sign does not matter


@FAST
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_wanda_nm_keeps_the_n_largest_scores_of_every_group(rows, groups, nm, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g)
    sq = torch.rand(groups * m, generator=g) * 10 + 0.01
    keep = wanda_mask(w, sq, NM(n, m))
    _groups_keep_top(keep, w.abs() * sq.sqrt(), n, m)


@FAST
@given(
    rows=st.integers(1, 6), cols=st.integers(1, 30), s=st.floats(0.0, 0.99), seed=st.integers(0, 2**31 - 1)
)
def test_wanda_row_keeps_the_highest_scores_of_each_row(rows, cols, s, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    sq = torch.rand(cols, generator=g) * 10
    keep = wanda_mask(w, sq, Unstructured(s))
    k = round(s * cols)
    assert bool(((~keep).sum(dim=1) == k).all())
    order = torch.sort(w.abs() * sq.sqrt(), dim=1, stable=True).indices
    expected = torch.ones_like(keep).scatter_(1, order[:, :k], False)
    assert torch.equal(keep, expected)


def test_wanda_rejects_norms_of_the_wrong_length():
    with pytest.raises(PrunekitError):
        wanda_mask(W_HAND, torch.ones(3), Unstructured(0.5))


# ------------------------------------------------------------------------------------------------- magnitude

# integer-valued weights in a small range: many ties (and zeros, and -w vs w), to pin ties by position
_small_ints = st.integers(-4, 4)


@st.composite
def _tied_weights(draw):
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 24))
    values = draw(st.lists(_small_ints, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)


@FAST
@given(w=_tied_weights(), s=st.floats(0.0, 0.99))
def test_magnitude_layer_removes_exactly_round_s_numel_smallest_ties_by_position(w, s):
    keep = magnitude_mask(w, Unstructured(s), "layer")
    k = round(s * w.numel())
    assert int((~keep).sum()) == k
    order = torch.sort(w.abs().reshape(-1), stable=True).indices
    expected = torch.ones(w.numel(), dtype=torch.bool)
    expected[order[:k]] = False
    assert torch.equal(keep, expected.reshape(w.shape))


@FAST
@given(w=_tied_weights(), s=st.floats(0.0, 0.99))
def test_magnitude_row_removes_exactly_round_s_cols_per_row_ties_by_position(w, s):
    keep = magnitude_mask(w, Unstructured(s), "row")
    k = round(s * w.shape[1])
    assert bool(((~keep).sum(dim=1) == k).all())
    order = torch.sort(w.abs(), dim=1, stable=True).indices
    expected = torch.ones_like(keep).scatter_(1, order[:, :k], False)
    assert torch.equal(keep, expected)


@FAST
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    s=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_magnitude_exact_counts_on_random_shapes(rows, cols, s, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    layer = magnitude_mask(w, Unstructured(s), "layer")
    row = magnitude_mask(w, Unstructured(s), "row")
    assert int((~layer).sum()) == round(s * rows * cols)
    assert bool(((~row).sum(dim=1) == round(s * cols)).all())
    # what is kept is never smaller than what is removed (layer: globally, row: within each row)
    if 0 < int((~layer).sum()) < w.numel():
        assert float(w.abs()[layer].min()) >= float(w.abs()[~layer].max())
    for r in range(rows):
        if 0 < int((~row[r]).sum()) < cols:
            assert float(w[r].abs()[row[r]].min()) >= float(w[r].abs()[~row[r]].max())


def test_magnitude_rejects_an_unknown_group_and_blocks_that_do_not_divide():
    with pytest.raises(PrunekitError):
        magnitude_mask(W_HAND, Unstructured(0.5), "global")
    with pytest.raises(PrunekitError, match="does not divide"):
        magnitude_mask(W_HAND, Block((3, 1), 0.5))  # block patterns: tests/methods/test_block_patterns.py


# ------------------------------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", [Unstructured(0.5), NM(2, 4)], ids=str)
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(seed, spec):
    # A typical-case claim, not a theorem: it holds with margin (>= 1.7x over 20 seeds) on correlated inputs
    # like these. With nearly independent features whose variances span 10^4, the default damp (1% of the
    # mean diagonal) swamps the small features and Wanda can win; the authors' code behaves the same.
    torch.manual_seed(seed)
    w, x = _layer_data(seed)
    new, keep = sparsegpt_prune(w, _hessian(x), spec)
    sq = x.pow(2).mean(dim=0)
    assert abs(float((~keep).float().mean()) - 0.5) < 1e-12
    err_sgpt = _recon_error(x, w, new)
    for group in ("layer", "row"):
        err_mag = _recon_error(x, w, w * magnitude_mask(w, spec, group))
        assert err_sgpt < err_mag
    for group in ("layer", "row"):
        err_wanda = _recon_error(x, w, w * wanda_mask(w, sq, spec, group))
        assert err_sgpt < err_wanda
    # and never worse than its own mask without the compensation
    assert err_sgpt < _recon_error(x, w, w * keep)


def _algorithm1(w, h, spec, blocksize, damp):
    """A literal transcription of SparseGPT's Algorithm 1 (the authors' ``fasterprune``), one weight at a
    time, with one change the kernel documents: exactly round(s * block) lowest scores are pruned (the
    reference prunes every score <= the k-th, one more)."""
    W, H = w.clone().float(), h.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), torch.zeros_like(W[:, i1:i2])
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if isinstance(spec, Unstructured):
            tmp = (W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2).flatten()
            mask1.view(-1)[torch.sort(tmp, stable=True).indices[: round(tmp.numel() * spec.sparsity)]] = True
        for i in range(i2 - i1):
            if isinstance(spec, NM) and i % spec.m == 0:
                tmp = W1[:, i : i + spec.m] ** 2 / torch.diag(Hinv1)[i : i + spec.m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, spec.m - spec.n, dim=1, largest=False)[1], True)
            w_col, d = W1[:, i], Hinv1[i, i]
            q = w_col.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w_col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, keep


@pytest.mark.parametrize("spec", [Unstructured(0.5), Unstructured(0.3), NM(2, 4), NM(4, 8)], ids=str)
@pytest.mark.parametrize("blocksize", [8, 32])
def test_sparsegpt_matches_algorithm_1(spec, blocksize):
    torch.manual_seed(0)
    w, x = _layer_data(11, rows=6, cols=40, tokens=128)
    x[:, 5] = 0.0  # one dead input too
    h = _hessian(x)
    new, keep = sparsegpt_prune(w, h, spec, blocksize=blocksize, damp=0.02)
    ref_w, ref_keep = _algorithm1(w, h, spec, blocksize, 0.02)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new, ref_w, rtol=1e-4, atol=1e-5)


def test_sparsegpt_two_inputs_obs_closed_form():
    # min_w' ||X (w - w')||^2 with w'_0 = 0: d/dw'_1 -> H11 (w'_1 - w_1) - H10 w_0 = 0, so
    # w'_1 = w_1 + w_0 * H01 / H11 (H the dampened Hessian the kernel works with)
    w = torch.tensor([[0.01, 5.0], [-0.02, -4.0], [0.015, 6.0]])
    h = torch.tensor([[2.0, 0.8], [0.8, 1.5]])
    damp = 0.01
    original_w, original_h = w.clone(), h.clone()
    new, keep = sparsegpt_prune(w, h, Unstructured(0.5), blocksize=2, damp=damp)
    assert torch.equal(keep, torch.tensor([[False, True]] * 3))  # the mask first: exactly column 0 pruned
    hd = h.double() + damp * float(h.diagonal().double().mean()) * torch.eye(2, dtype=torch.float64)
    w1 = w[:, 1].double() + w[:, 0].double() * hd[0, 1] / hd[1, 1]
    assert torch.equal(new[:, 0], torch.zeros(3))
    assert torch.allclose(new[:, 1].double(), w1, rtol=1e-6, atol=1e-6)
    # the compensation is not a no-op here: it moved the kept weights
    assert not torch.allclose(new[:, 1], w[:, 1], rtol=0, atol=1e-4)
    assert torch.equal(w, original_w) and torch.equal(h, original_h)


@pytest.mark.parametrize("blocksize", [4, 128])
def test_sparsegpt_pruned_prefix_is_the_joint_least_squares_optimum(blocksize):
    # when the pruned inputs P all come before the kept ones K, sequential OBS inside one block equals the
    # joint optimum for every row: w'_K = w_K + H_KK^-1 H_KP w_P, w'_P = 0
    torch.manual_seed(0)
    x = torch.randn(64, 4) @ torch.tensor(
        [[1.0, 0.4, 0.2, 0.0], [0.0, 1.0, 0.5, 0.3], [0.0, 0.0, 1.0, -0.4], [0.0, 0.0, 0.0, 1.0]]
    )
    h = _hessian(x)
    w = torch.tensor([[1e-3, -2e-3, 3.0, -2.0], [2e-3, 1e-3, -1.5, 4.0], [-1e-3, 3e-3, 2.5, 1.0]])
    damp = 0.05
    new, keep = sparsegpt_prune(w, h, Unstructured(0.5), blocksize=blocksize, damp=damp)
    assert torch.equal(keep, torch.tensor([[False, False, True, True]] * 3))
    hd = h.double() + damp * float(h.diagonal().double().mean()) * torch.eye(4, dtype=torch.float64)
    wd = w.double()
    optimum = wd[:, 2:] + torch.linalg.solve(hd[2:, 2:], hd[2:, :2] @ wd[:, :2].T).T
    assert torch.equal(new[:, :2], torch.zeros(3, 2))
    assert torch.allclose(new[:, 2:].double(), optimum, rtol=1e-5, atol=1e-6)


def test_sparsegpt_with_a_diagonal_hessian_is_layerwise_wanda_without_compensation():
    # diagonal H: OBS moves nothing and the score w^2 / [H^-1]_jj is Wanda's score squared (on dampened H)
    torch.manual_seed(3)
    w = torch.randn(8, 32)
    diag = torch.rand(32) * 5 + 0.1
    damp = 0.01
    hd = diag + damp * diag.mean()
    new, keep = sparsegpt_prune(w, torch.diag(diag), Unstructured(0.5), blocksize=32, damp=damp)
    assert torch.equal(keep, wanda_mask(w, hd, Unstructured(0.5), "layer"))
    assert torch.equal(new, w * keep)
    new, keep = sparsegpt_prune(w, torch.diag(diag), NM(2, 4), blocksize=32, damp=damp)
    assert torch.equal(keep, wanda_mask(w, hd, NM(2, 4)))
    assert torch.equal(new, w * keep)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_sparsegpt_exact_count_per_column_block_and_zeros_only_where_pruned(s):
    torch.manual_seed(0)
    w, x = _layer_data(5, rows=8, cols=300, tokens=512)
    new, keep = sparsegpt_prune(w, _hessian(x), Unstructured(s), blocksize=128)
    assert new.dtype == torch.float32 and keep.dtype == torch.bool and new.shape == keep.shape == w.shape
    for start, width in ((0, 128), (128, 128), (256, 44)):
        block = keep[:, start : start + width]
        assert int((~block).sum()) == round(s * 8 * width), (start, width)
    assert bool((new[~keep] == 0).all())  # exact zeros where pruned (kept weights may be anything)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("blocksize", [8, 32, 128])
def test_sparsegpt_nm_groups(nm, blocksize):
    n, m = nm
    torch.manual_seed(1)
    w, x = _layer_data(7, rows=12, cols=96, tokens=256)
    new, keep = sparsegpt_prune(w, _hessian(x), NM(n, m), blocksize=blocksize)
    assert bool((keep.reshape(12, -1, m).sum(dim=-1) == n).all())
    assert bool(((new != 0).reshape(12, -1, m).sum(dim=-1) <= n).all())
    assert bool((new[~keep] == 0).all())


def test_sparsegpt_at_zero_sparsity_returns_the_weight_unchanged():
    w, x = _layer_data(4, rows=5, cols=24, tokens=64)
    new, keep = sparsegpt_prune(w, _hessian(x), Unstructured(0.0), blocksize=8)
    assert bool(keep.all()) and torch.equal(new, w)


def test_sparsegpt_does_not_modify_its_inputs():
    torch.manual_seed(0)
    w, x = _layer_data(2, rows=6, cols=16, tokens=64)
    h = _hessian(x)
    for weight in (w, w.to(torch.bfloat16), w.double()):
        w0, h0 = weight.clone(), h.clone()
        for spec in (Unstructured(0.5), NM(2, 4)):
            new, _ = sparsegpt_prune(weight, h, spec, blocksize=8)
            assert torch.equal(weight, w0) and torch.equal(h, h0)
            assert new.data_ptr() != weight.data_ptr()


def test_sparsegpt_dead_inputs_get_zero_weight_and_do_not_break_cholesky():
    torch.manual_seed(0)
    x = torch.randn(128, 12)
    x[:, [3, 7]] = 0.0  # two features that are never active: H_jj = 0 and their rows/columns vanish
    h = _hessian(x)
    assert float(h[3, 3]) == 0.0 and float(h[7, 7]) == 0.0
    w = torch.randn(5, 12) + 3.0  # large weights on the dead inputs: magnitude alone would keep them
    for spec in (Unstructured(0.0), Unstructured(0.25), Unstructured(0.5), NM(2, 4)):
        new, keep = sparsegpt_prune(w, h, spec, blocksize=4)
        assert bool(torch.isfinite(new).all())
        assert torch.equal(new[:, [3, 7]], torch.zeros(5, 2))
        assert bool((new[~keep] == 0).all())
    # every input dead: H = 0 still factors
    new, keep = sparsegpt_prune(w, torch.zeros(12, 12), Unstructured(0.5))
    assert torch.equal(new, torch.zeros(5, 12))


def test_sparsegpt_errors():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(PrunekitError):
        sparsegpt_prune(torch.randn(4, 8, 1), h, Unstructured(0.5))  # not 2-D
    with pytest.raises(PrunekitError):
        sparsegpt_prune(torch.randn(8), h, Unstructured(0.5))  # not 2-D
    with pytest.raises(PrunekitError):
        sparsegpt_prune(w, torch.eye(4), Unstructured(0.5))  # Hessian (out, out) instead of (in, in)
    with pytest.raises(PrunekitError):
        sparsegpt_prune(w, torch.eye(8)[:, :7], Unstructured(0.5))
    with pytest.raises(PrunekitError):
        sparsegpt_prune(w, h, NM(2, 4), blocksize=6)  # blocksize not a multiple of M
    with pytest.raises(PrunekitError):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), NM(2, 4))  # inputs not a multiple of M
    for damp in (0.0, -0.01, float("nan")):
        with pytest.raises(PrunekitError):
            sparsegpt_prune(w, h, Unstructured(0.5), damp=damp)
    for blocksize in (0, -1, True, 2.0):
        with pytest.raises(PrunekitError):
            sparsegpt_prune(w, h, Unstructured(0.5), blocksize=blocksize)
    with pytest.raises(PrunekitError, match="multiple of the block"):
        sparsegpt_prune(w, h, Block((2, 2), 0.5), blocksize=3)
    with pytest.raises(PrunekitError):  # an indefinite Hessian is reported, not a raw LinAlgError
        sparsegpt_prune(w, -5.0 * torch.eye(8), Unstructured(0.5))


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_sparsegpt_factorises_in_float64_when_float32_fails():
    """A rank-4 Hessian stored exactly in float32 (a scaled Hadamard basis, eigenvalues 1000/700/300/100,
    the rest 0): dampened by 1e-9 of its mean diagonal, the dampening vanishes in float32 rounding (62.5 +
    6e-8 == 62.5) and the float32 Cholesky fails; in float64 the matrix is positive definite."""
    q = _hadamard(64) / 8
    eig = torch.zeros(64, dtype=torch.float64)
    eig[:4] = torch.tensor([1000.0, 700.0, 300.0, 100.0])
    h64 = q @ torch.diag(eig) @ q.T
    h = h64.float()
    assert torch.equal(h.double(), h64)  # the float32 Hessian is exactly this PSD matrix
    damp = 1e-9
    H32, _ = dampened_hessian(h, damp, torch.float32)
    assert int(torch.linalg.cholesky_ex(H32)[1]) != 0  # float32 fails
    H, _ = dampened_hessian(h, damp, torch.float64)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    U, dead = inverse_hessian_factor(h, damp)
    assert U.dtype == torch.float32 and not bool(dead.any())
    assert torch.equal(U, expected)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    new, keep = sparsegpt_prune(w, h, Unstructured(0.5), blocksize=16, damp=damp)
    assert bool(torch.isfinite(new).all()) and int((~keep).sum()) == 8 * 32
    assert bool((new[~keep] == 0).all())


def test_sparsegpt_layers_sharing_a_hessian_share_its_factor(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    h = _hessian(x)
    config = LLMPruneConfig("sparsegpt", Unstructured(0.5), blocksize=16)
    weights = [torch.randn(8, 32) for _ in range(3)]
    calls = []
    real = sparsegpt_module.inverse_hessian_factor

    def counting(hessian, damp):
        calls.append(hessian)
        return real(hessian, damp)

    monkeypatch.setattr(sparsegpt_module, "inverse_hessian_factor", counting)
    shared = [sparsegpt_module.sparsegpt_layer(w, h, Unstructured(0.5), config) for w in weights]
    assert len(calls) == 1  # q, k, v: one factorisation
    other = h.clone()  # equal values, another tensor: factorised again
    sparsegpt_module.sparsegpt_layer(weights[0], other, Unstructured(0.5), config)
    assert len(calls) == 2
    monkeypatch.undo()
    for w, got in zip(weights, shared):
        assert torch.equal(got, sparsegpt_prune(w, h, Unstructured(0.5), blocksize=16)[0])
    calls.clear()
    del h, other
    assert sparsegpt_module._LAST_FACTOR.entry is None  # the factor goes with its Hessian
