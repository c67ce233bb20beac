"""The built-in fine-tuning loop: masks hold through every optimizer it offers, and a sparsifier given to it
is stepped once per optimizer step (AGP reaches its target; data-driven criteria get their batches)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fixtures.models import mlp as shared_mlp
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks, get_masks, weight_parameter
from prunekit.recovery import TrainConfig, train
from prunekit.schedule import AGP
from prunekit.sparsifier import Sparsifier

LAYERS = ("0", "2")  # "4" is the classifier, dense by default


def mlp(seed: int = 0) -> nn.Sequential:
    return shared_mlp((12, 24, 16, 3), seed)


def loader(n: int = 160, batch_size: int = 16, seed: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=gen)
    y = (x[:, :3].argmax(dim=1)).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_masks_hold_through_a_hundred_steps_of_each_optimizer(optimizer):
    model = mlp()
    # dense steps first, so momentum and Adam moments are non-zero where the masks then prune
    train(model, loader(), TrainConfig(epochs=1, lr=0.01, optimizer=optimizer), progress=False)
    gen = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(model.get_submodule(n).weight.shape, generator=gen) < 0.4 for n in LAYERS}
    apply_masks(model, masks)
    cfg = TrainConfig(epochs=10, lr=0.01, optimizer=optimizer, weight_decay=0.1)
    data = loader()
    before = {n: weight_parameter(model.get_submodule(n)).detach().clone() for n in LAYERS}
    losses = train(model, data, cfg, progress=False)
    assert cfg.epochs * len(data) >= 100 and len(losses) == cfg.epochs
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0), name
        assert not torch.equal(weight[mask], before[name][mask]), name  # the kept weights did train
        assert torch.equal(get_masks(model)[name], mask)
    assert not model.training


def test_agp_sparsifier_in_the_loop_reaches_its_target_exactly():
    model = mlp()
    data = loader()
    steps = 3 * len(data)
    sparsifier = Sparsifier(model, 0.75, schedule=AGP(end=steps - 5, every=4))
    sparsifier.prepare()
    train(model, data, TrainConfig(epochs=3, lr=0.01), sparsifier=sparsifier, progress=False)
    assert sparsifier.step_count == steps
    for name in LAYERS:
        weight = model.get_submodule(name).weight
        assert abs(int((weight == 0).sum()) - round(0.75 * weight.numel())) <= 1


@pytest.mark.parametrize("criterion", ["taylor", "obd", "wanda"])
def test_data_driven_criteria_get_the_calibration_batches(criterion):
    data = loader()
    calibration = [tuple(batch) for batch in data][:2]
    cfg = TrainConfig(epochs=2, lr=0.01)

    def sparsifier(model: nn.Module) -> Sparsifier:
        sp = Sparsifier(model, 0.5, criterion=criterion, schedule=AGP(end=12, every=4))
        sp.prepare()
        return sp

    model = mlp()
    with pytest.raises(PrunekitError, match="calibration batches"):
        train(model, data, cfg, sparsifier=sparsifier(model), progress=False)
    model = mlp()
    train(model, data, cfg, sparsifier=sparsifier(model), calibration=calibration, progress=False)
    for name in LAYERS:
        weight = model.get_submodule(name).weight
        if criterion == "wanda":  # compared within each output row
            assert torch.all((weight == 0).sum(dim=1) == round(0.5 * weight.shape[1]))
        else:
            assert abs(int((weight == 0).sum()) - round(0.5 * weight.numel())) <= 1


def test_zero_epochs_leave_the_model_alone():
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert train(model, loader(), TrainConfig(epochs=0), progress=False) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("fields", "needle"),
    [({"optimizer": "sgdd"}, "optimizer"), ({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr")],
)
def test_bad_train_config_raises(fields, needle):
    with pytest.raises(PrunekitError, match=needle):
        TrainConfig(**fields)
