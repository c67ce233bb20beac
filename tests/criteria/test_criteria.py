"""Each criterion against its formula, computed by hand on tiny layers; hooks and gradients left clean."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.calib.hooks import Hooks
from prunekit.criteria import CRITERIA, magnitude_scores, make_criterion
from prunekit.criteria.base import gradient_passes
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks, weight_parameter
from prunekit.schedule import AGP
from prunekit.sparsifier import Sparsifier


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def tiny(seed: int = 0, masked: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
    if masked:
        apply_masks(model, {"0": torch.tensor([[True, False, True], [False, True, True]])})
    return model


def batches(n: int, seed: int = 1, rows: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 3, generator=gen), torch.randn(rows, 2, generator=gen)) for _ in range(n)]


def hand_grads(model: nn.Module, data) -> list[torch.Tensor]:
    """dL_b/dW of layer "0" for each batch, through the effective (masked) weight."""
    original = weight_parameter(model[0])
    return [torch.autograd.grad(mse(model(x), y), original)[0] for x, y in data]


# -- magnitude and random -------------------------------------------------------------------------------


def test_magnitude_is_abs_of_the_effective_weight():
    model = tiny(masked=True)
    scores = make_criterion("magnitude").scores("0", model[0])
    assert torch.equal(scores, model[0].weight.detach().abs())
    assert torch.all(scores[~model[0].parametrizations.weight[0].mask] == 0)
    w = torch.tensor([[-2.0, 0.5], [0.0, -0.25]])
    assert torch.equal(magnitude_scores(w), torch.tensor([[2.0, 0.5], [0.0, 0.25]]))


def test_random_is_reproducible_per_seed_and_layer_and_differs_across_seeds():
    layer = nn.Linear(50, 40)
    a = make_criterion("random", seed=3).scores("fc", layer)
    again = make_criterion("random", seed=3)
    # same values on every call (selection reads scores more than once) and whatever the layer order
    again.scores("other", nn.Linear(5, 5))
    assert torch.equal(again.scores("fc", layer), a)
    assert torch.equal(again.scores("fc", layer), a)
    assert not torch.equal(make_criterion("random", seed=4).scores("fc", layer), a)
    assert not torch.equal(make_criterion("random", seed=3).scores("fc2", layer), a)
    assert a.shape == layer.weight.shape


def test_random_scores_are_uniform_ish():
    scores = make_criterion("random", seed=7).scores("big", nn.Linear(200, 100)).reshape(-1)
    n = scores.numel()
    assert scores.min() >= 0 and scores.max() < 1
    assert abs(float(scores.mean()) - 0.5) < 0.02
    counts = torch.histc(scores, bins=10, min=0, max=1)
    assert torch.all((counts - n / 10).abs() < 0.1 * n / 10)
    # Kolmogorov-Smirnov distance to U(0, 1): critical value at alpha=1e-3 is ~1.95/sqrt(n)
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((ecdf - scores.sort().values.double()).abs().max()) < 1.95 / n**0.5


# -- gradient criteria ----------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(n_batches=st.integers(1, 4), seed=st.integers(0, 1000), masked=st.booleans())
def test_taylor_is_mean_over_batches_of_abs_w_times_g(n_batches, seed, masked):
    model = tiny(seed, masked)
    data = batches(n_batches, seed)
    w = model[0].weight.detach()
    expected = torch.stack([(w * g).abs() for g in hand_grads(model, data)]).mean(0)
    crit = make_criterion("taylor")
    crit.collect(model, {"0": model[0]}, data, mse)
    torch.testing.assert_close(crit.scores("0", model[0]), expected, rtol=1e-5, atol=1e-7)
    if masked:
        assert torch.all(crit.scores("0", model[0])[w == 0] == 0)


def test_taylor_hand_checked_numbers():
    # L = (w . x - y)^2 with one sample: g = 2 (w.x - y) x;  |w g| elementwise
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    model = nn.Sequential(layer)
    data = [
        (torch.tensor([[3.0, 1.0]]), torch.tensor([[0.0]])),
        (torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0]])),
    ]
    # batch 1: w.x - y = 1, g = [6, 2], |w g| = [6, 4];  batch 2: w.x - y = -2, g = [-4, -4], |w g| = [4, 8]
    crit = make_criterion("taylor")
    crit.collect(model, {"0": layer}, data, mse)
    assert torch.allclose(crit.scores("0", layer), torch.tensor([[5.0, 6.0]]))
    # obd: 0.5 w^2 mean(g^2) = 0.5 * [1, 4] * [(36 + 16) / 2, (4 + 16) / 2] = [13, 20]
    # (batches of one sample: the per-sample Fisher and the mini-batch one agree)
    for name in ("obd", "obd-batch"):
        obd = make_criterion(name)
        obd.collect(model, {"0": layer}, data, mse)
        assert torch.allclose(obd.scores("0", layer), torch.tensor([[13.0, 20.0]]))
    # both samples in one batch: obd still averages the per-sample g^2 ([13, 20]); obd-batch squares the
    # batch gradient (g = [6, 2] + [-4, -4]) / 2 = [1, -1]: 0.5 * [1, 4] * [1, 1] = [0.5, 2]
    together = [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))]
    for name, expected in (("obd", [[13.0, 20.0]]), ("obd-batch", [[0.5, 2.0]])):
        obd = make_criterion(name)
        obd.collect(model, {"0": layer}, together, mse)
        assert torch.allclose(obd.scores("0", layer), torch.tensor(expected)), name


@settings(max_examples=8, deadline=None)
@given(n_batches=st.integers(1, 4), seed=st.integers(0, 1000), masked=st.booleans())
def test_obd_is_half_w_squared_times_mean_squared_gradient(n_batches, seed, masked):
    model = tiny(seed, masked)
    data = batches(n_batches, seed)
    w = model[0].weight.detach()
    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(len(x))]
    for name, passes in (("obd", samples), ("obd-batch", data)):
        fisher = torch.stack([g**2 for g in hand_grads(model, passes)]).mean(0)
        crit = make_criterion(name)
        crit.collect(model, {"0": model[0]}, data, mse)
        torch.testing.assert_close(crit.scores("0", model[0]), 0.5 * w**2 * fisher, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["taylor", "obd", "obd-batch"])
def test_gradient_passes_leave_existing_grads_and_mode_untouched(name):
    model = tiny(masked=True)
    model.train()
    weight = weight_parameter(model[0])
    weight.grad = torch.full_like(weight, 7.0)
    saved = weight.grad
    model[0].bias.grad = torch.full_like(model[0].bias, 3.0)
    crit = make_criterion(name)
    crit.collect(model, {"0": model[0], "2": model[2]}, batches(3), mse)
    assert weight.grad is saved and torch.all(weight.grad == 7.0)
    assert torch.all(model[0].bias.grad == 3.0)
    assert model[2].weight.grad is None and model[2].bias.grad is None
    assert model.training


def test_gradient_passes_restore_grads_when_the_loss_raises():
    model = tiny()
    weight = weight_parameter(model[0])
    weight.grad = torch.ones_like(weight)
    saved = weight.grad

    def bad_loss(out, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gradient_passes(model, {"0": model[0]}, batches(1), bad_loss, lambda *a: None)
    assert weight.grad is saved and model.training


def test_gradient_criteria_need_a_loss_and_a_batch():
    model = tiny()
    with pytest.raises(PrunekitError, match="loss"):
        make_criterion("taylor").collect(model, {"0": model[0]}, batches(1), None)
    with pytest.raises(PrunekitError, match="batch"):
        make_criterion("obd").collect(model, {"0": model[0]}, [], mse)
    for name in ("taylor", "obd", "wanda"):
        with pytest.raises(PrunekitError, match="calibration"):
            make_criterion(name).scores("0", model[0])


# -- wanda ------------------------------------------------------------------------------------------------


def collect_wanda(model: nn.Module, layers: dict[str, nn.Module], inputs: list[torch.Tensor]):
    crit = make_criterion("wanda")
    crit.collect(model, layers, [(x, None) for x in inputs])
    return crit


@pytest.mark.parametrize("shape", [(5, 6), (3, 7, 6)])  # (batch, features) and (batch, seq, features)
def test_wanda_linear_is_abs_w_times_rms_of_every_token(shape):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model = nn.Sequential(layer)
    # batches of different sizes: the norm is over all tokens, not a mean of per-batch norms
    inputs = [torch.randn(*shape) * torch.arange(1, 7), torch.randn(2, *shape[1:])]
    crit = collect_wanda(model, {"0": layer}, inputs)
    tokens = torch.cat([x.reshape(-1, 6) for x in inputs])
    norm = tokens.pow(2).mean(0).sqrt()
    expected = layer.weight.detach().abs() * norm  # row i, column j: |W_ij| * ||x_j||
    torch.testing.assert_close(crit.scores("0", layer), expected)
    # the per-column factor really is per input feature
    for j in range(6):
        torch.testing.assert_close(crit.scores("0", layer)[:, j], layer.weight[:, j].detach().abs() * norm[j])


@pytest.mark.parametrize("groups", [1, 2])
def test_wanda_conv_uses_per_channel_norms_of_the_matching_input_channel(groups):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
    model = nn.Sequential(conv)
    inputs = [
        torch.randn(2, 4, 5, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1),
        torch.randn(3, 4, 5, 5),
    ]
    crit = collect_wanda(model, {"0": conv}, inputs)
    channels = torch.cat([x.transpose(0, 1).reshape(4, -1) for x in inputs], dim=1)  # (C, batch * H * W)
    norm = channels.pow(2).mean(1).sqrt()
    w = conv.weight.detach()
    out_per_group, in_per_group = 6 // groups, 4 // groups
    expected = torch.empty_like(w)
    for o in range(6):
        for i in range(in_per_group):
            expected[o, i] = w[o, i].abs() * norm[(o // out_per_group) * in_per_group + i]
    torch.testing.assert_close(crit.scores("0", conv), expected)


def test_wanda_on_masked_conv_matches_unmasked_norms():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3)
    masked = nn.Conv2d(4, 4, 3)
    masked.load_state_dict(conv.state_dict())
    mask = torch.rand(conv.weight.shape) > 0.3
    apply_masks(masked, {"": mask})
    x = [torch.randn(2, 4, 6, 6)]
    plain = collect_wanda(conv, {"": conv}, x).scores("", conv)
    with_mask = collect_wanda(masked, {"": masked}, x).scores("", masked)
    torch.testing.assert_close(with_mask, torch.where(mask, plain, 0.0))


def no_forward_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_wanda_removes_its_hooks_and_restores_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    collect_wanda(model, {"0": model[0], "2": model[2]}, [torch.randn(3, 4)])
    assert no_forward_hooks(model)
    assert model.training


def test_wanda_removes_its_hooks_when_the_forward_raises():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            self.fc(x)  # the hook runs, then the model fails
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        collect_wanda(model, {"fc": model.fc}, [torch.randn(2, 4)])
    assert no_forward_hooks(model)
    assert model.training
    with pytest.raises(PrunekitError, match="batch"):  # an empty loader is a clear error, hooks gone too
        collect_wanda(nn.Sequential(model.fc), {"0": model.fc}, [])
    assert no_forward_hooks(model)


def test_hooks_manager_removes_on_exception():
    model = nn.Linear(2, 2)
    with pytest.raises(KeyError), Hooks() as hooks:
        hooks.forward(model, lambda *a: None)
        hooks.forward_pre(model, lambda *a: None)
        assert model._forward_hooks and model._forward_pre_hooks
        raise KeyError("x")
    assert no_forward_hooks(model)


# -- movement -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_movement_accumulates_minus_w_times_g(masked):
    model = tiny(3, masked)
    layer = model[0]
    crit = make_criterion("movement")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    expected = torch.zeros_like(layer.weight)
    crit.start({"0": layer})  # Sparsifier.prepare() does this
    for x, y in batches(4, seed=5):
        optimizer.zero_grad()
        mse(model(x), y).backward()
        w = layer.weight.detach().clone()
        g = weight_parameter(layer).grad.detach().clone()
        expected -= w * g  # the gradient and the weight it was computed at (before the step)
        optimizer.step()
        crit.on_step({"0": layer})  # the documented place: after optimizer.step()
    torch.testing.assert_close(crit.scores("0", layer), expected)
    assert not torch.all(expected == 0)
    if masked:
        assert torch.all(crit.scores("0", layer)[layer.weight.detach() == 0] == 0)


def test_movement_under_agp_masks_only_grow_and_pruned_scores_freeze():
    """The documented difference from Sanh et al.: no regrowth. Pruned weights stay pruned at every AGP
    step, and their scores stop changing once they are pruned (their masked weight and gradient are 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    sparsifier = Sparsifier(model, 0.75, criterion="movement", schedule=AGP(end=6, every=1))
    sparsifier.prepare()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    frozen: dict[tuple[str, int], float] = {}
    previous = None
    for x, y in batches(10, seed=7):
        optimizer.zero_grad()
        mse(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        masks = sparsifier.masks()
        for name, mask in masks.items():
            score = sparsifier.criterion.scores(name, sparsifier.layers[name]).reshape(-1)
            for i in (~mask).reshape(-1).nonzero().flatten().tolist():
                frozen.setdefault((name, i), float(score[i]))
                assert float(score[i]) == frozen[(name, i)]  # unchanged since it was pruned
            if previous is not None:
                assert not (mask & ~previous[name]).any()  # nothing pruned came back
        previous = masks
    assert set(previous) == {"0"}  # the final classifier stays dense by default
    assert int((~previous["0"]).sum()) == round(0.75 * 48) and len(frozen) == 36


def test_movement_without_steps_raises_and_skips_layers_without_grad():
    model = tiny()
    crit = make_criterion("movement")
    with pytest.raises(PrunekitError, match="step"):
        crit.scores("0", model[0])
    crit.on_step({"0": model[0]})  # no backward yet: nothing to accumulate
    with pytest.raises(PrunekitError):
        crit.scores("0", model[0])


# -- registry --------------------------------------------------------------------------------------------


def test_unknown_criterion_raises_with_did_you_mean():
    with pytest.raises(PrunekitError, match="did you mean 'magnitude'") as info:
        make_criterion("magnitud")
    assert "wanda" in str(info.value)  # the allowed names are listed
    with pytest.raises(PrunekitError, match="did you mean 'wanda'"):
        make_criterion("wand")


def test_all_builtin_criteria_are_registered():
    assert {"magnitude", "random", "taylor", "obd", "obd-batch", "wanda", "movement"} <= set(CRITERIA.names())
