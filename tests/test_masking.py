"""Masks as parametrizations: pruned weights are exactly zero in forward, get no gradient, and stay zero
through optimizers, save/load and squash."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError
from prunekit.masking import (
    WeightMask,
    apply_masks,
    get_masks,
    load_masked_state_dict,
    mask_of,
    squash,
    weight_parameter,
)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


LAYERS = ("0", "3", "5")


def random_masks(model: nn.Module, density: float = 0.5, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(model.get_submodule(name).weight.shape, generator=gen) < density for name in LAYERS
    }


def batch(seed: int = 2, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def assert_pruned_zero(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0), name
        assert int((weight == 0).sum()) == int((~mask).sum()), name  # no kept weight became zero either


# -- forward and gradient -----------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_pruned_weights_are_zero_in_forward_and_get_zero_gradient(density, seed):
    model = make_model()
    masks = random_masks(model, density, seed)
    apply_masks(model, masks)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert torch.equal(module.weight, torch.where(mask, weight_parameter(module), 0.0))
        assert torch.all(module.weight[~mask] == 0)
    x, y = batch(seed)
    # the forward pass really uses the masked weight
    dense = copy.deepcopy(model)
    squash(dense)
    assert torch.equal(model(x), dense(x))
    nn.functional.cross_entropy(model(x), y).backward()
    for name, mask in masks.items():
        grad = weight_parameter(model.get_submodule(name)).grad
        assert grad is not None
        assert torch.all(grad[~mask] == 0)


def test_masked_module_keeps_its_weight_name_and_class_behaviour():
    model = make_model()
    apply_masks(model, random_masks(model))
    module = model.get_submodule("3")
    assert isinstance(module, nn.Linear)
    assert parametrize.is_parametrized(module, "weight")
    assert isinstance(mask_of(module), WeightMask)
    keys = set(model.state_dict())
    assert "3.parametrizations.weight.original" in keys
    assert "3.parametrizations.weight.0.mask" in keys
    assert "3.bias" in keys


# -- optimizers ---------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=1e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero_through_optimizer(name):
    model = make_model()
    ones = {n: torch.ones(model.get_submodule(n).weight.shape, dtype=torch.bool) for n in LAYERS}
    apply_masks(model, ones)
    optimizer = OPTIMIZERS[name](model.parameters())
    x, y = batch()
    # a few dense steps first, so momentum / Adam moments are non-zero where the mask then prunes
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    masks = random_masks(model, 0.4)
    apply_masks(model, masks)
    assert_pruned_zero(model, masks)
    for step in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        for n, mask in masks.items():
            assert torch.all(model.get_submodule(n).weight[~mask] == 0), (name, step, n)
    assert_pruned_zero(model, masks)
    assert all(torch.equal(get_masks(model)[n], masks[n]) for n in LAYERS)


# -- save / load ----------------------------------------------------------------------------------------


def trained_masked_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = make_model()
    masks = random_masks(model, 0.3)
    apply_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = batch()
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, masks


def test_state_dict_round_trip_into_fresh_architecture():
    model, masks = trained_masked_model()
    fresh = make_model(seed=123)  # different weights, no masks
    load_masked_state_dict(fresh, model.state_dict())
    loaded = get_masks(fresh)
    assert set(loaded) == set(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    x, _ = batch(7)
    assert torch.equal(fresh(x), model(x))
    assert_pruned_zero(fresh, masks)


def test_torch_save_load_round_trip(tmp_path):
    model, masks = trained_masked_model()
    path = tmp_path / "masked.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = make_model(seed=99)
    load_masked_state_dict(fresh, state)
    assert all(torch.equal(get_masks(fresh)[n], masks[n]) for n in masks)
    x, _ = batch(8)
    assert torch.equal(fresh(x), model(x))


def test_load_into_a_model_that_already_has_other_masks():
    model, masks = trained_masked_model()
    fresh = make_model(seed=5)
    apply_masks(fresh, random_masks(fresh, 0.9, seed=42))
    load_masked_state_dict(fresh, model.state_dict())
    assert all(torch.equal(get_masks(fresh)[n], masks[n]) for n in masks)
    x, _ = batch(9)
    assert torch.equal(fresh(x), model(x))


def test_deepcopy_of_masked_model_is_independent():
    model, masks = trained_masked_model()
    clone = copy.deepcopy(model)
    x, _ = batch(3)
    assert torch.equal(clone(x), model(x))
    apply_masks(clone, {n: torch.zeros_like(m) for n, m in masks.items()})
    assert all(torch.equal(get_masks(model)[n], masks[n]) for n in masks)


# -- squash -------------------------------------------------------------------------------------------------


def test_squash_leaves_plain_parameters_with_the_zeros():
    model, masks = trained_masked_model()
    x, _ = batch(4)
    before = model(x)
    out = squash(model)
    assert out is model
    for module in model.modules():
        assert not parametrize.is_parametrized(module)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert type(weight) is nn.Parameter
        assert torch.all(weight[~mask] == 0)
    assert get_masks(model) == {}
    assert not any("parametrizations" in key for key in model.state_dict())
    assert torch.equal(model(x), before)
    # a fresh architecture loads the squashed state with the ordinary torch API
    fresh = make_model(seed=11)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), before)


def test_squash_on_unmasked_model_is_a_no_op():
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    squash(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# -- updating masks -------------------------------------------------------------------------------------


def test_updating_masks_keeps_the_same_parameter_and_optimizer_keeps_working():
    model = make_model()
    first = random_masks(model, 0.7, seed=3)
    apply_masks(model, first)
    params = {n: weight_parameter(model.get_submodule(n)) for n in LAYERS}
    buffers = {n: mask_of(model.get_submodule(n)).mask for n in LAYERS}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = batch()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    second = {n: m & random_masks(model, 0.5, seed=4)[n] for n, m in first.items()}
    apply_masks(model, second)
    for n in LAYERS:
        assert weight_parameter(model.get_submodule(n)) is params[n]
        assert mask_of(model.get_submodule(n)).mask is buffers[n]
    # the optimizer still updates the very tensors the model uses
    before = {n: params[n].detach().clone() for n in LAYERS}
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for n, mask in second.items():
        assert not torch.equal(params[n][mask], before[n][mask])
    assert_pruned_zero(model, second)


def test_apply_masks_zeroes_the_stored_original():
    model = make_model()
    masks = random_masks(model)
    apply_masks(model, masks)
    for n, mask in masks.items():
        assert torch.all(weight_parameter(model.get_submodule(n))[~mask] == 0)


# -- errors ---------------------------------------------------------------------------------------------


def test_wrong_shaped_mask_raises():
    model = make_model()
    with pytest.raises(PrunekitError, match="'3'.*shape"):
        apply_masks(model, {"3": torch.ones(16, 7, dtype=torch.bool)})
    assert not parametrize.is_parametrized(model.get_submodule("3"))


def test_wrong_shaped_mask_update_raises_and_keeps_the_old_mask():
    model = make_model()
    masks = random_masks(model)
    apply_masks(model, masks)
    with pytest.raises(PrunekitError, match="shape"):
        apply_masks(model, {"5": torch.ones(5, 15, dtype=torch.bool)})
    assert torch.equal(get_masks(model)["5"], masks["5"])


def test_mask_for_missing_or_weightless_module_raises():
    model = make_model()
    with pytest.raises(PrunekitError, match="no module named 'nope'"):
        apply_masks(model, {"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(PrunekitError, match="ReLU"):
        apply_masks(model, {"1": torch.ones(1, dtype=torch.bool)})


def test_squashing_a_deepcopy_leaves_the_original_masked_and_working():
    # deepcopy shares torch's injected Parametrized* class; squash must not strip `weight` from the original
    model, masks = trained_masked_model()
    x, _ = batch(6)
    before = model(x)
    exported = squash(copy.deepcopy(model))
    assert torch.equal(exported(x), before)
    assert torch.equal(model(x), before)
    assert all(torch.equal(get_masks(model)[n], masks[n]) for n in masks)
    squash(model)
    assert torch.equal(model(x), before)
