"""ALPS, DSnoT and the reconstruction kernels against their papers' definitions, on small cases.

* ALPS (Meng et al. 2024): the ADMM W-step is the closed-form minimiser of the augmented Lagrangian; the
  objective 1/2 tr((W - W^) H (W - W^)^T) ends below the initial projection's, SparseGPT's and Wanda's;
  0 ADMM iterations keep the initial projection and 0 refit steps return the ADMM's D; the PCG refit
  never raises the objective and converges to the exact least squares on the support; exact pattern counts.
* DSnoT (Zhang et al. 2024): one-for-one swaps per row (and per group of M), so every row's count and the
  N:M pattern are exactly kept; |E[error]| of every row never grows; revived weights take their dense value.
* Reconstruction: Adam with the mask fixed never raises the output error and keeps pruned weights exactly
  zero; the closed-form masked least squares equals lstsq on the kept columns.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.calib.stats import RunningMoments
from prunekit.errors import PrunekitError
from prunekit.methods import sparsegpt_prune, wanda_mask
from prunekit.methods.alps import alps_prune, objective, pcg_refit, rho_factor
from prunekit.methods.dsnot import dsnot_refine, row_errors
from prunekit.methods.reconstruct import fit_kept_weights, masked_least_squares, output_error
from prunekit.spec import NM, Block, Unstructured

FAST = settings(max_examples=15, deadline=None)


def _layer(seed: int, rows: int = 16, cols: int = 64, tokens: int = 512, offset: float = 0.5):
    """A random layer and LLM-like inputs: correlated features (rank-8 signal plus noise), scales spread
    over an order of magnitude, and a nonzero mean per feature (DSnoT's expectation term)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.5, cols)[torch.randperm(cols, generator=g)]
    signal = torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g) / 8**0.5
    x = (
        signal + 0.3 * torch.randn(tokens, cols, generator=g) + offset * torch.randn(cols, generator=g)
    ) * scales
    return torch.randn(rows, cols, generator=g), x


def _gram(x: torch.Tensor) -> torch.Tensor:
    return (x.double().T @ x.double() / x.shape[0]).float()


def _damped(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    out = h.clone()
    out.diagonal().add_(damp * torch.diagonal(h).mean())
    return out


def _nm_counts(keep: torch.Tensor, m: int) -> torch.Tensor:
    return keep.reshape(keep.shape[0], -1, m).sum(dim=-1)


# ---------------------------------------------------------------------------------------------------- ALPS


@pytest.mark.parametrize("spec", [Unstructured(0.5), Unstructured(0.7), NM(2, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_alps_objective_decreases_below_the_start_sparsegpt_and_wanda(spec, seed):
    w, x = _layer(seed)
    h = _gram(x)
    hd = _damped(h)
    start, _ = alps_prune(w, h, spec, iters=0, refit_iters=0)
    out, keep = alps_prune(w, h, spec)
    sgpt, _ = sparsegpt_prune(w, h, spec)
    wanda = w * wanda_mask(w, torch.diagonal(h), spec)
    f = objective(out, w, hd)
    assert f < objective(start, w, hd)
    assert f < objective(sgpt, w, hd)
    assert f < objective(wanda, w, hd)
    assert torch.equal(out != 0, keep & (out != 0)) and bool((out[~keep] == 0).all())


def test_alps_zero_iterations_is_the_initial_projection_by_wanda_score():
    w, x = _layer(3)
    h = _gram(x)
    out, keep = alps_prune(w, h, Unstructured(0.6), iters=0, refit_iters=0, group="row")
    assert torch.equal(keep, wanda_mask(w, torch.diagonal(_damped(h)), Unstructured(0.6), "row"))
    assert torch.allclose(out, w * keep, rtol=1e-5, atol=1e-6)


def test_alps_zero_refit_steps_return_the_admm_support_and_values():
    w, x = _layer(4)
    h = _gram(x)
    d, keep_d = alps_prune(w, h, NM(2, 4), iters=30, refit_iters=0)
    refit, keep_r = alps_prune(w, h, NM(2, 4), iters=30, refit_iters=20)
    assert torch.equal(keep_d, keep_r)  # the refit never changes the support
    assert objective(refit, w, _damped(h)) <= objective(d, w, _damped(h))
    assert not torch.allclose(d, refit)


def test_alps_w_step_minimises_the_augmented_lagrangian():
    """The W-update (H + rho I)^-1 (H W^ - V + rho D) zeroes the gradient of
    f(W) + <V, W - D> + rho/2 ||W - D||^2, as the eigendecomposition route computes it."""
    w, x = _layer(5, rows=4, cols=16)
    h = _damped(_gram(x)).double()
    g = torch.Generator().manual_seed(0)
    d, v, rho = torch.randn(4, 16, generator=g).double(), torch.randn(4, 16, generator=g).double(), 0.7
    evals, q = torch.linalg.eigh(h)
    step = (((w.double() @ h - v + rho * d) @ q) / (evals + rho)) @ q.T
    grad = (step - w.double()) @ h + v + rho * (step - d)
    assert float(grad.abs().max()) < 1e-8


def test_alps_pcg_reaches_the_exact_least_squares_on_the_support():
    w, x = _layer(6, rows=8, cols=32)
    h = _damped(_gram(x))
    keep = wanda_mask(w, torch.diagonal(h), NM(2, 4))
    exact = masked_least_squares(w, keep, _gram(x))
    values = [objective(pcg_refit(w, keep, w, h, n), w, h) for n in (0, 1, 2, 5, 10, 40)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:]))  # never raises the objective
    assert torch.allclose(pcg_refit(w, keep, w, h, 40), exact, rtol=1e-3, atol=1e-4)


@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    s=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
    seed=st.integers(0, 10_000),
)
@FAST
def test_alps_exact_counts(rows, groups, s, seed):
    w, x = _layer(seed, rows=rows, cols=4 * groups, tokens=64)
    h = _gram(x)
    out, keep = alps_prune(w, h, Unstructured(s), iters=12, refit_iters=3)
    assert int((~keep).sum()) == round(s * w.numel())
    assert bool((out[~keep] == 0).all())
    out, keep = alps_prune(w, h, NM(2, 4), iters=12, refit_iters=3)
    assert bool((_nm_counts(keep, 4) == 2).all()) and bool((out[~keep] == 0).all())


def test_alps_rho_schedule_and_errors():
    assert [rho_factor(c, 1000) for c in (100, 99, 5, 4, 1, 0)] == [1.3, 1.2, 1.2, 1.1, 1.1, 1.0]
    w, x = _layer(0)
    h = _gram(x)
    with pytest.raises(PrunekitError, match="iters"):
        alps_prune(w, h, Unstructured(0.5), iters=-1)
    with pytest.raises(PrunekitError, match="rho"):
        alps_prune(w, h, Unstructured(0.5), rho=0.0)
    with pytest.raises(PrunekitError, match="Hessian"):
        alps_prune(w, h[:3, :3], Unstructured(0.5))
    with pytest.raises(PrunekitError, match="not block patterns"):
        alps_prune(w, h, Block((2, 1), 0.5))


def test_alps_dead_inputs_get_zero_weight():
    w, x = _layer(7)
    x[:, :4] = 0
    out, _ = alps_prune(w, _gram(x), Unstructured(0.5))
    assert bool((out[:, :4] == 0).all()) and bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------------------------------- DSnoT


def _moments(x: torch.Tensor):
    stat = RunningMoments()
    stat.add_batch(x)
    return stat.value()


@pytest.mark.parametrize("spec", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(1, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dsnot_keeps_every_row_count_and_nm_exactly_and_lowers_the_expected_error(spec, seed):
    w, x = _layer(seed)
    mom = _moments(x)
    keep = wanda_mask(w, mom.sq_mean, spec)
    sparse = w * keep
    out, new = dsnot_refine(w, sparse, keep, mom.mean, mom.sq_mean, spec, cycles=50, threshold=0.0)
    assert torch.equal(new.sum(dim=1), keep.sum(dim=1))
    if isinstance(spec, NM):
        assert bool((_nm_counts(new, spec.m) == spec.n).all())
    assert bool((out[~new] == 0).all())
    assert torch.equal(out[new], w[new])  # revived and kept weights have their dense values
    before, after = row_errors(w, sparse, mom.mean).abs(), row_errors(w, out, mom.mean).abs()
    assert bool((after <= before + 1e-5).all())
    assert float(after.sum()) < float(before.sum())
    assert not torch.equal(new, keep)


def test_dsnot_keeps_updated_weights_of_an_updating_method():
    w, x = _layer(8)
    mom = _moments(x)
    sparse, keep = sparsegpt_prune(w, _gram(x), Unstructured(0.6))
    out, new = dsnot_refine(w, sparse, keep, mom.mean, mom.sq_mean, Unstructured(0.6), threshold=0.0)
    stayed = keep & new
    assert torch.equal(out[stayed], sparse[stayed])  # SparseGPT's updates survive
    grown = new & ~keep
    assert bool(grown.any()) and torch.equal(out[grown], w[grown])
    assert bool((row_errors(w, out, mom.mean).abs() <= row_errors(w, sparse, mom.mean).abs() + 1e-5).all())


def test_dsnot_hand_example_one_swap():
    """One row W = (4, -3, 1, 2), kept {0, 1}; every input has mean 1 and variance 1, so the expected error
    is e = 1 + 2 = 3. Cycle 1: growth scores sign(e) W_j mu_j / var_j over the pruned j are 1 (j=2) and 2
    (j=3): grow j=3, e -> 1; the kept k with sign(1) S_k mu_k <= 0 is k=1 (S=-3): prune it, e -> -2, and
    |-2| < 3 so the swap is made. Cycle 2: scores over the pruned {1, 2} are 3 and -1: grow j=1, e -> 1; no
    kept k has S_k <= 0, so the lowest Wanda score among all kept, k=3; e would be 3, not below |-2|: the
    row is finished with keep {0, 3}."""
    w = torch.tensor([[4.0, -3.0, 1.0, 2.0]])
    keep = torch.tensor([[True, True, False, False]])
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # mean 1, variance 1 per feature
    mom = _moments(x)
    out, new = dsnot_refine(w, w * keep, keep, mom.mean, mom.sq_mean, Unstructured(0.5), threshold=0.0)
    assert new.tolist() == [[True, False, False, True]]
    assert out.tolist() == [[4.0, 0.0, 0.0, 2.0]]


def test_dsnot_zero_cycles_or_a_large_threshold_change_nothing():
    w, x = _layer(9)
    mom = _moments(x)
    keep = wanda_mask(w, mom.sq_mean, Unstructured(0.5))
    for kwargs in ({"cycles": 0}, {"threshold": 1e9}):
        out, new = dsnot_refine(w, w * keep, keep, mom.mean, mom.sq_mean, Unstructured(0.5), **kwargs)
        assert torch.equal(new, keep) and torch.equal(out, w * keep)


def test_dsnot_errors():
    w, x = _layer(0)
    mom = _moments(x)
    keep = w > 0
    with pytest.raises(PrunekitError, match="per input feature"):
        dsnot_refine(w, w * keep, keep, mom.mean[:3], mom.sq_mean, Unstructured(0.5))
    with pytest.raises(PrunekitError, match="cycles"):
        dsnot_refine(w, w * keep, keep, mom.mean, mom.sq_mean, Unstructured(0.5), cycles=-1)
    with pytest.raises(PrunekitError, match="not block patterns"):
        dsnot_refine(w, w * keep, keep, mom.mean, mom.sq_mean, Block((2, 1), 0.5))


def test_running_moments_match_the_definitions():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, n, 6, generator=g) + 2.0 for n in (3, 7, 1)]
    stat = RunningMoments(gram=True)
    for b in batches:
        stat.add_batch(b)
    allx = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    value = stat.value()
    assert torch.allclose(value.mean.double(), allx.mean(0), atol=1e-5)
    assert torch.allclose(value.sq_mean.double(), allx.pow(2).mean(0), atol=1e-5)
    assert torch.allclose(value.gram.double(), allx.T @ allx / allx.shape[0], atol=1e-4)
    assert torch.allclose(value.variance.double(), allx.var(0, unbiased=False), atol=1e-4)


# ------------------------------------------------------------------------------------------- reconstruction


class _TwoLayers(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_kept_weights_never_raises_the_error_and_keeps_zeros(seed):
    dense = _TwoLayers(seed)
    inputs = torch.randn(12, 5, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        targets = dense(inputs)
    pruned = _TwoLayers(seed)
    keeps = [
        torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(i)) > 0.5
        for i, m in enumerate((pruned.a, pruned.b))
    ]
    for p in pruned.parameters():
        p.requires_grad_(False)
    weights = [pruned.a.weight, pruned.b.weight]
    for w in weights:
        w.requires_grad_(True)
    before, after = fit_kept_weights(pruned, weights, keeps, inputs, targets, epochs=5, lr=1e-2, batch=3)
    assert after < before  # a real improvement on this easy case
    assert after == pytest.approx(output_error(pruned, inputs, targets))
    for w, k in zip(weights, keeps):
        assert bool((w[~k] == 0).all())
    # a learning rate that diverges: the start is restored, the error is unchanged
    start = [w.detach().clone() for w in weights]
    b2, a2 = fit_kept_weights(pruned, weights, keeps, inputs, targets, epochs=2, lr=1e3, batch=1)
    assert a2 <= b2
    if a2 == b2:
        assert all(torch.equal(w, s) for w, s in zip(weights, start))


def test_fit_kept_weights_zero_epochs_only_masks():
    model = _TwoLayers(0)
    keeps = [model.a.weight > 0, model.b.weight > 0]
    inputs = torch.randn(4, 3, 8)
    before, after = fit_kept_weights(model, [model.a.weight, model.b.weight], keeps, inputs, inputs, epochs=0)
    assert before == after and bool((model.a.weight[~keeps[0]] == 0).all())


@pytest.mark.parametrize("spec", [Unstructured(0.5), NM(2, 4)])
def test_masked_least_squares_equals_lstsq_on_the_kept_columns(spec):
    w, x = _layer(11, rows=6, cols=16, tokens=200)
    keep = wanda_mask(w, x.pow(2).mean(0), spec)
    got = masked_least_squares(w, keep, _gram(x), damp=1e-6)
    for r in range(w.shape[0]):
        cols = keep[r].nonzero().squeeze(1)
        want = torch.linalg.lstsq(x[:, cols].double(), (x.double() @ w[r].double()).unsqueeze(1)).solution
        assert torch.allclose(got[r, cols].double(), want.squeeze(1), rtol=1e-3, atol=1e-4)
        assert bool((got[r, ~keep[r]] == 0).all())


def test_masked_least_squares_with_a_cross_matrix_fits_the_dense_inputs_target():
    """Inputs seen by the pruned layer differ from the dense layer's (x_d = x + noise): the fit targets
    x_d . W^, through C = E[x x_d^T]."""
    w, x = _layer(12, rows=5, cols=12, tokens=300)
    xd = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[:, ::3] = False
    cross = (x.double().T @ xd.double() / x.shape[0]).float()
    got = masked_least_squares(w, keep, _gram(x), cross, damp=1e-6)
    for r in range(w.shape[0]):
        cols = keep[r].nonzero().squeeze(1)
        want = torch.linalg.lstsq(x[:, cols].double(), (xd.double() @ w[r].double()).unsqueeze(1)).solution
        assert torch.allclose(got[r, cols].double(), want.squeeze(1), rtol=1e-3, atol=1e-4)
