"""The training-time lifecycle: exact counts for every pattern and comparison group, masks that only
shrink, AGP through step(), data-driven criteria, state round-trips and reproducibility."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from fixtures.models import mlp as shared_mlp
from prunekit.criteria import make_criterion
from prunekit.errors import PrunekitError
from prunekit.masking import get_masks
from prunekit.schedule import AGP, geometric_rounds
from prunekit.sparsifier import Sparsifier
from prunekit.spec import NM, Block, Unstructured


def mlp(seed: int = 0) -> nn.Sequential:
    return shared_mlp((16, 32, 24, 4), seed)


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )


MLP_LAYERS = ("0", "2")  # "4" is the classifier, dense by default


def data(seed: int = 1, n: int = 3, rows: int = 8, features: int = 16, classes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, features, generator=gen), torch.randint(0, classes, (rows,), generator=gen))
        for _ in range(n)
    ]


def zeros(model: nn.Module, name: str) -> int:
    return int((model.get_submodule(name).weight == 0).sum())


def train_steps(model: nn.Module, steps: int, sparsifier: Sparsifier | None = None, seed: int = 2) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data(seed, n=steps)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.step()


def assert_ranked(scores: torch.Tensor, keep: torch.Tensor, dim_rows: bool = False) -> None:
    """Every kept score is >= every pruned score within the comparison group."""
    scores, keep = scores.reshape(scores.shape[0], -1), keep.reshape(keep.shape[0], -1)
    groups = zip(scores, keep, strict=True) if dim_rows else [(scores.reshape(-1), keep.reshape(-1))]
    for s, k in groups:
        if k.any() and (~k).any():
            assert s[k].min() >= s[~k].max()


# -- exact counts -------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 100))
def test_unstructured_layer_counts_are_exact(sparsity, seed):
    model = mlp(seed)
    Sparsifier(model, sparsity, group="layer").prune()
    for name in MLP_LAYERS:
        n = model.get_submodule(name).weight.numel()
        assert abs(zeros(model, name) - round(sparsity * n)) <= 1
    assert zeros(model, "4") == 0


@settings(max_examples=10, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 100))
def test_unstructured_global_count_is_exact(sparsity, seed):
    model = mlp(seed)
    scores = {n: model.get_submodule(n).weight.detach().abs().clone() for n in MLP_LAYERS}
    masks = Sparsifier(model, sparsity, group="global").prune()
    total = sum(model.get_submodule(n).weight.numel() for n in MLP_LAYERS)
    assert abs(sum(zeros(model, n) for n in MLP_LAYERS) - round(sparsity * total)) <= len(MLP_LAYERS)
    # one threshold across layers
    assert_ranked(
        torch.cat([scores[n].reshape(-1) for n in MLP_LAYERS]).unsqueeze(0),
        torch.cat([masks[n].reshape(-1) for n in MLP_LAYERS]).unsqueeze(0),
    )


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_row_counts_are_exact(sparsity):
    model = mlp()
    scores = {n: model.get_submodule(n).weight.detach().abs().clone() for n in MLP_LAYERS}
    masks = Sparsifier(model, sparsity, group="row").prune()
    for name in MLP_LAYERS:
        weight = model.get_submodule(name).weight
        per_row = (weight == 0).sum(dim=1)
        assert torch.all((per_row - round(sparsity * weight.shape[1])).abs() <= 1)
        assert_ranked(scores[name], masks[name], dim_rows=True)


def assert_nm(weight: torch.Tensor, n: int, m: int) -> None:
    groups = weight.detach().movedim(1, -1).reshape(-1, m)  # m consecutive inputs at each (out, kernel pos)
    nonzero = (groups != 0).sum(dim=1)
    assert torch.all(nonzero <= n)
    assert torch.all(nonzero == n)  # random weights are never exactly zero: exactly n survive


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_linear_groups(n, m):
    model = mlp()
    scores = {k: model.get_submodule(k).weight.detach().abs().clone() for k in MLP_LAYERS}
    masks = Sparsifier(model, NM(n, m)).prune()
    for name in MLP_LAYERS:
        assert_nm(model.get_submodule(name).weight, n, m)
        # within each group the kept scores are the largest
        s = scores[name].reshape(-1, m)
        k = masks[name].reshape(-1, m)
        assert torch.all(
            torch.where(k, s, float("inf")).min(1).values >= torch.where(~k, s, -1.0).max(1).values
        )


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8)])
def test_nm_conv_groups_run_along_input_channels(n, m):
    model = cnn()
    Sparsifier(model, NM(n, m)).prune()
    for name in ("0", "2"):
        assert_nm(model.get_submodule(name).weight, n, m)


def test_nm_spec_refuses_a_sparsity_instead_of_ignoring_it():
    model = mlp()
    sp = Sparsifier(model, "2:4")
    with pytest.raises(PrunekitError, match="fixes the sparsity at 50%"):
        sp.prune(0.3)
    assert get_masks(model) == {}  # nothing was pruned
    sp.prune()
    for name in MLP_LAYERS:
        assert_nm(model.get_submodule(name).weight, 2, 4)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, "0.5", float("nan")])
def test_bad_round_sparsity_raises(sparsity):
    with pytest.raises(PrunekitError, match="sparsity"):
        Sparsifier(mlp(), 0.5).prune(sparsity)


def test_nm_layer_with_bad_input_dimension_is_refused_up_front():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    with pytest.raises(PrunekitError, match="'0'"):
        Sparsifier(model, "2:4")


@pytest.mark.parametrize("group", ["layer", "global"])
@pytest.mark.parametrize(("model_fn", "shape"), [(mlp, (4, 4)), (cnn, (4, 8))])
def test_block_counts_and_whole_tiles(model_fn, shape, group):
    model = model_fn()
    layers = ("0", "2")
    Sparsifier(model, Block(shape, 0.5), group=group).prune()
    r, c = shape
    total_tiles, dead_tiles = 0, 0
    for name in layers:
        weight = model.get_submodule(name).weight.detach()
        flat = weight.reshape(weight.shape[0], -1)
        tiles = (flat != 0).reshape(flat.shape[0] // r, r, flat.shape[1] // c, c).sum(dim=(1, 3))
        assert torch.all((tiles == 0) | (tiles == r * c))  # a tile is pruned whole or kept whole
        dead = int((tiles == 0).sum())
        if group == "layer":
            assert abs(dead - round(0.5 * tiles.numel())) <= 1
        total_tiles += tiles.numel()
        dead_tiles += dead
    assert abs(dead_tiles - round(0.5 * total_tiles)) <= len(layers)


def test_block_pattern_with_the_row_group_is_refused_up_front():
    with pytest.raises(PrunekitError, match="not per row"):
        Sparsifier(mlp(), Block((4, 4), 0.5), group="row")
    with pytest.raises(PrunekitError, match="not per row"):  # an overridden layer counts too
        Sparsifier(mlp(), 0.5, group="row", overrides={"2": "block:4x4@0.5"})


def test_overridden_layer_keeps_its_spec_at_every_sparsity():
    model = mlp()
    sp = Sparsifier(model, 0.5, overrides={"2": "2:4"})
    sp.prune(0.2)
    assert_nm(model.get_submodule("2").weight, 2, 4)
    assert abs(zeros(model, "0") - round(0.2 * 512)) <= 1
    assert sp.layer_specs(0.2) == {"0": Unstructured(0.2), "2": NM(2, 4)}


# -- iterative rounds and AGP -----------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["layer", "row", "global"])
def test_iterative_rounds_only_shrink_masks(group):
    model = mlp()
    sp = Sparsifier(model, 0.9, group=group)
    previous = {n: torch.ones(model.get_submodule(n).weight.shape, dtype=torch.bool) for n in MLP_LAYERS}
    for sparsity in geometric_rounds(0.9, 0.4):
        train_steps(model, 5)  # the magnitudes change between rounds
        masks = sp.prune(sparsity)
        for name in MLP_LAYERS:
            assert not torch.any(masks[name] & ~previous[name]), "a pruned weight came back"
            assert torch.equal(get_masks(model)[name], masks[name])
        total = sum(masks[n].numel() for n in MLP_LAYERS)
        dead = sum(int((~masks[n]).sum()) for n in MLP_LAYERS)
        if group == "global":
            assert abs(dead - round(sparsity * total)) <= len(MLP_LAYERS)
        elif group == "layer":
            for name in MLP_LAYERS:
                assert abs(int((~masks[name]).sum()) - round(sparsity * masks[name].numel())) <= 1
        previous = masks
    assert sum(zeros(model, n) for n in MLP_LAYERS) == sum(int((~previous[n]).sum()) for n in MLP_LAYERS)


def test_agp_through_step_reaches_final_sparsity_at_end():
    model = mlp()
    agp = AGP(end=12, start=2, every=3)
    sp = Sparsifier(model, 0.8, schedule=agp)
    sp.prepare()
    sizes = {n: model.get_submodule(n).weight.numel() for n in MLP_LAYERS}
    expected = 0.0
    for step in range(agp.end + 1):
        train_steps(model, 1, seed=step)
        sp.step()  # this call is step number `step`
        if agp.is_pruning_step(step):
            expected = agp.sparsity_at(step, 0.8)
        for name, size in sizes.items():
            assert abs(zeros(model, name) - round(expected * size)) <= 1, (step, name)
    assert expected == 0.8
    assert sp.step_count == agp.end + 1
    before = {n: zeros(model, n) for n in MLP_LAYERS}
    train_steps(model, 5, sp)  # after `end` the sparsity stays where it is
    assert {n: zeros(model, n) for n in MLP_LAYERS} == before


def test_movement_criterion_through_step():
    model = mlp()
    sp = Sparsifier(model, 0.6, criterion="movement")
    sp.prepare()
    train_steps(model, 6, sp)
    scores = {n: sp.criterion.scores(n, sp.layers[n]).clone() for n in MLP_LAYERS}
    masks = sp.prune()
    for name in MLP_LAYERS:
        assert abs(zeros(model, name) - round(0.6 * masks[name].numel())) <= 1
        assert_ranked(scores[name], masks[name])


def test_movement_without_training_steps_is_a_clear_error():
    with pytest.raises(PrunekitError, match="step"):
        Sparsifier(mlp(), 0.5, criterion="movement").prune()


# -- data-driven criteria --------------------------------------------------------------------------------


@pytest.mark.parametrize(("criterion", "group"), [("wanda", "row"), ("taylor", "layer"), ("obd", "layer")])
def test_data_criteria_through_prune(criterion, group):
    model = mlp()
    batches = data()
    loss_fn = nn.functional.cross_entropy
    # scores computed independently on an untouched copy
    reference = copy.deepcopy(model)
    crit = make_criterion(criterion)
    crit.collect(reference, {n: reference.get_submodule(n) for n in MLP_LAYERS}, batches, loss_fn)
    scores = {n: crit.scores(n, reference.get_submodule(n)) for n in MLP_LAYERS}

    sp = Sparsifier(model, 0.5, criterion=criterion)
    assert sp.group == group  # the criterion's paper comparison group by default
    masks = sp.prune(batches=batches, loss_fn=loss_fn)
    for name in MLP_LAYERS:
        weight = model.get_submodule(name).weight
        if group == "row":
            per_row = (weight == 0).sum(dim=1)
            assert torch.all((per_row - round(0.5 * weight.shape[1])).abs() <= 1)
        else:
            assert abs(zeros(model, name) - round(0.5 * weight.numel())) <= 1
        assert_ranked(scores[name], masks[name], dim_rows=group == "row")


@pytest.mark.parametrize("criterion", ["wanda", "taylor", "obd"])
def test_data_criteria_without_batches_raise(criterion):
    sp = Sparsifier(mlp(), 0.5, criterion=criterion)
    with pytest.raises(PrunekitError, match="calibration batches"):
        sp.prune()


@pytest.mark.parametrize("criterion", ["taylor", "obd"])
def test_gradient_criteria_without_loss_raise(criterion):
    with pytest.raises(PrunekitError, match="loss"):
        Sparsifier(mlp(), 0.5, criterion=criterion).prune(batches=data())


def test_unknown_criterion_and_group_raise():
    with pytest.raises(PrunekitError, match="did you mean 'taylor'"):
        Sparsifier(mlp(), 0.5, criterion="tailor")
    with pytest.raises(PrunekitError, match="comparison group"):
        Sparsifier(mlp(), 0.5, group="rows").prune()


# -- state, reproducibility, squash ------------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    model = mlp()
    sp = Sparsifier(model, 0.6, schedule=AGP(end=4, every=2))
    sp.prepare()
    train_steps(model, 5, sp)
    path = tmp_path / "sparsifier.pt"
    torch.save(sp.state_dict(), path)

    fresh = mlp(seed=9)
    sp2 = Sparsifier(fresh, 0.6, schedule=AGP(end=4, every=2))
    sp2.load_state_dict(torch.load(path, weights_only=True))
    assert sp2.step_count == sp.step_count == 5
    assert set(sp2.masks()) == set(MLP_LAYERS)
    for name in MLP_LAYERS:
        assert torch.equal(sp2.masks()[name], sp.masks()[name])
        assert torch.all(fresh.get_submodule(name).weight[~sp.masks()[name]] == 0)
    assert sp2.state_dict()["step"] == 5


def test_load_state_dict_with_wrong_shapes_raises():
    sp = Sparsifier(mlp(), 0.5)
    sp.prune()
    state = sp.state_dict()
    other = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 4))
    with pytest.raises(PrunekitError, match="shape"):
        Sparsifier(other, 0.5).load_state_dict(state)


@pytest.mark.parametrize("group", ["layer", "global", "row"])
def test_same_seed_gives_identical_random_masks(group):
    first = Sparsifier(mlp(), 0.7, criterion="random", group=group, seed=5).prune()
    second = Sparsifier(mlp(), 0.7, criterion="random", group=group, seed=5).prune()
    other = Sparsifier(mlp(), 0.7, criterion="random", group=group, seed=6).prune()
    assert all(torch.equal(first[n], second[n]) for n in MLP_LAYERS)
    assert not all(torch.equal(first[n], other[n]) for n in MLP_LAYERS)
    # random scores are read several times during selection: counts must still be exact
    if group == "global":
        expected = round(0.7 * sum(first[n].numel() for n in MLP_LAYERS))
    elif group == "layer":
        expected = sum(round(0.7 * first[n].numel()) for n in MLP_LAYERS)
    else:
        expected = sum(first[n].shape[0] * round(0.7 * first[n].shape[1]) for n in MLP_LAYERS)
    dead = sum(int((~first[n]).sum()) for n in MLP_LAYERS)
    assert abs(dead - expected) <= len(MLP_LAYERS)


def test_random_masks_do_not_depend_on_the_weights():
    a = Sparsifier(mlp(seed=0), 0.5, criterion="random", seed=1).prune()
    b = Sparsifier(mlp(seed=1), 0.5, criterion="random", seed=1).prune()
    assert all(torch.equal(a[n], b[n]) for n in MLP_LAYERS)


def test_squash_returns_plain_modules_with_the_zeros():
    model = mlp()
    sp = Sparsifier(model, 0.5)
    masks = sp.prune()
    x = data()[0][0]
    before = model(x)
    out = sp.squash()
    assert out is model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for name in MLP_LAYERS:
        assert torch.all(model.get_submodule(name).weight[~masks[name]] == 0)
    assert torch.equal(model(x), before)
