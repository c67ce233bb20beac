"""Hard-concrete L0 gates (Louizos et al. 2018): the formulas against the paper's definitions (and the
expected L0 against a Monte-Carlo estimate), the gates as a parametrization next to prunekit masks, a
tiny training run that reaches the target density, and exact masks that survive squash."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit.criteria.l0 import (
    BETA,
    GAMMA,
    ZETA,
    HardConcreteGate,
    L0Gates,
    density_penalty,
    deterministic_gate,
    expected_l0,
    gate_of,
    prob_nonzero,
    sample_gate,
)
from prunekit.errors import PrunekitError
from prunekit.masking import get_masks, mask_of, squash
from prunekit.recovery import TrainConfig, train
from prunekit.sparsifier import Sparsifier


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


@pytest.mark.parametrize("log_alpha", [-3.0, -0.4, 0.0, 0.7, 4.0])
@pytest.mark.parametrize("u", [1e-4, 0.2, 0.5, 0.93])
def test_sample_and_deterministic_gate_are_the_papers_formulas(log_alpha, u):
    s = _sigmoid((math.log(u) - math.log(1 - u) + log_alpha) / BETA)
    expected = min(1.0, max(0.0, s * (ZETA - GAMMA) + GAMMA))
    got = sample_gate(torch.tensor([log_alpha], dtype=torch.float64), torch.tensor([u], dtype=torch.float64))
    assert float(got) == pytest.approx(expected, abs=1e-12)
    z_hat = min(1.0, max(0.0, _sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA))
    assert float(deterministic_gate(torch.tensor([log_alpha], dtype=torch.float64))) == pytest.approx(z_hat)
    p = _sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))
    assert float(prob_nonzero(torch.tensor([log_alpha], dtype=torch.float64))) == pytest.approx(p)


def test_expected_l0_matches_monte_carlo():
    log_alpha = torch.tensor([-2.5, -1.0, 0.0, 0.5, 2.0, 3.5], dtype=torch.float64)
    u = torch.rand(200_000, len(log_alpha), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = sample_gate(log_alpha, u.clamp(1e-9, 1 - 1e-9))
    freq = (z > 0).double().mean(0)
    # 200k samples: standard error <= 0.0012 per gate
    assert torch.allclose(freq, prob_nonzero(log_alpha), atol=0.005)
    assert float(expected_l0(log_alpha)) == pytest.approx(float(freq.sum()), abs=0.02)
    assert float((z == 1).double().mean()) > 0 and float((z == 0).double().mean()) > 0  # hard: both ends hit


def test_density_penalty_formula():
    assert float(density_penalty(torch.tensor(30.0), 100, 0.2, 0.5)) == pytest.approx(0.5 * 100 * 0.1**2)


def test_gate_parametrization_samples_in_training_and_is_deterministic_in_eval():
    layer = nn.Linear(4, 3)
    gate = HardConcreteGate((3, 1), init=0.0)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", gate, unsafe=True)
    original = layer.parametrizations.weight.original.detach()
    layer.eval()
    z_hat = deterministic_gate(gate.log_alpha.detach())
    assert torch.equal(layer.weight.detach(), original * z_hat)  # one gate per output row
    layer.train()
    torch.manual_seed(0)
    a = layer.weight.detach().clone()
    b = layer.weight.detach().clone()
    assert not torch.equal(a, b)  # a fresh sample each forward


def _gate_training(gates: L0Gates) -> dict:
    return {"extra_optimizer": gates.optimizer(), "extra_loss": gates.penalty}


def _problem(seed: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 12, generator=gen)
    y = x[:, :3].argmax(1)
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)


@pytest.mark.parametrize(
    ("granularity", "group"), [("weight", "layer"), ("weight", "global"), ("channel", "layer")]
)
def test_training_reaches_the_target_and_finish_gives_exact_masks(granularity, group):
    model, x, y, loader = _problem()
    sparsifier = Sparsifier(model, 0.75, criterion="l0", group=group)
    gates = sparsifier.criterion.configure(
        sparsifier.specs, sparsifier.group, granularity=granularity, lr=0.1, warmup=90
    )
    sparsifier.prepare()
    assert all(gate_of(m) is not None and mask_of(m) is not None for m in sparsifier.layers.values())
    assert gates.expected_density()["*"] > 0.95  # gates start open: the model starts as the dense one
    cfg = TrainConfig(epochs=15, lr=0.01, optimizer="adam", weight_decay=0.0)
    train(model, loader, cfg, progress=False, sparsifier=sparsifier, **_gate_training(gates))
    assert gates.steps == 15 * len(loader) and gates.target_density(0.75) == pytest.approx(0.25)
    density = gates.expected_density()
    # measured over data seeds 1-4: weight gates 0.245-0.254 (per layer with group "layer"), channel gates
    # 0.27-0.29 (16-32 gates per layer: the task pushes back harder against the quadratic penalty)
    tol = 0.015 if granularity == "weight" else 0.05
    assert density["*"] == pytest.approx(0.25, abs=tol), density
    if group == "layer":
        assert all(abs(d - 0.25) < tol for d in density.values()), density

    model.eval()
    with torch.no_grad():
        effective = {n: m.weight.detach().clone() for n, m in sparsifier.layers.items()}
        stored = {
            n: m.parametrizations.weight.original.detach().clone() for n, m in sparsifier.layers.items()
        }
        z_hat = {n: deterministic_gate(gate_of(m).log_alpha) for n, m in sparsifier.layers.items()}
    masks = gates.finish(model)
    assert set(masks) == {"0", "2"}
    weights = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    if group == "global":
        assert pruned == round(0.75 * weights)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert gate_of(module) is None and torch.equal(get_masks(model)[name], mask)
        if group == "layer" and granularity == "weight":
            assert int((~mask).sum()) == round(0.75 * mask.numel())
        if granularity == "channel":  # whole output rows, an exact number of them
            rows = mask.all(dim=1)
            assert torch.equal(mask, rows[:, None].expand_as(mask))
            assert int((~rows).sum()) == round(0.75 * len(rows))
        # kept weights carry their test-time gate (or their trained value where that gate was 0)
        z = z_hat[name].expand_as(mask)
        want = torch.where(z > 0, effective[name], stored[name])
        assert torch.allclose(module.weight.detach()[mask], want[mask])
        assert torch.all(module.weight.detach()[~mask] == 0)
    squash(model)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert mask_of(module) is None and torch.all(module.weight[~mask] == 0)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.85  # 3 classes; measured 0.90-0.996 over data seeds 1-4


def test_configure_refuses_what_the_gates_cannot_learn():
    model, *_ = _problem()
    sparsifier = Sparsifier(model, "2:4", criterion="l0")
    with pytest.raises(PrunekitError, match="unstructured sparsity; layer '0' has 2:4"):
        sparsifier.criterion.configure(sparsifier.specs)
    with pytest.raises(PrunekitError, match="granularity must be one of weight, channel"):
        L0Gates().configure({}, granularity="block")
    with pytest.raises(PrunekitError, match="not per 'row'"):
        L0Gates().configure({}, group="row")
    with pytest.raises(PrunekitError, match="call configure"):
        Sparsifier(model, 0.5, criterion="l0").prepare()


# -- recipes -------------------------------------------------------------------------------------------
def _recipe(**prune) -> dict:
    stage = {
        "type": "prune",
        "pattern": 0.8,
        "criterion": "l0",
        "finetune": {"epochs": 1, "lr": 0.01},
        **prune,
    }
    return {
        "name": "l0",
        "threads": 1,
        "model": {"builtin": "resnet-digits", "args": {"widths": [4, 4, 4], "blocks": 1}},
        "stages": [{"type": "train", "epochs": 1, "lr": 0.05}, stage],
    }


def test_recipe_l0_is_validated():
    from prunekit.jobs import recipe

    got = recipe.from_dict(_recipe(l0={"granularity": "channel"})).stages[1].l0
    assert (got.granularity, got.penalty, got.warmup) == ("channel", 0.05, 0.75)
    with pytest.raises(PrunekitError, match="learns its masks while the model trains: give 'finetune'"):
        recipe.from_dict(_recipe(finetune=None))
    with pytest.raises(PrunekitError, match="the density penalty is its schedule"):
        recipe.from_dict(_recipe(schedule={"type": "iterative", "rate": 0.2}))
    with pytest.raises(PrunekitError, match="not per row"):
        recipe.from_dict(_recipe(group="row"))
    with pytest.raises(PrunekitError, match="'l0' settings need criterion 'l0', not 'magnitude'"):
        recipe.from_dict(_recipe(criterion="magnitude", l0={}))
    with pytest.raises(PrunekitError, match=r"stages\[1\]\.l0: unknown key 'lamda'"):
        recipe.from_dict(_recipe(l0={"lamda": 1.0}))


@pytest.mark.slow  # a whole (tiny) recipe run: ~20 s on a busy machine
def test_recipe_run_with_l0_and_distillation_gives_exact_masks_and_a_reloadable_artifact(tmp_path):
    from prunekit.artifact import load_artifact
    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    data = _recipe(
        group="global",
        finetune={"epochs": 2, "lr": 0.01, "distill": {"alpha": 0.5, "features": ["layers.0"]}},
    )
    data["stages"] += [
        {"type": "finetune", "epochs": 1, "lr": 0.01, "distill": {}},
        {"type": "evaluate", "label": "pruned", "latency_runs": 1, "latency_warmup": 0},
        {"type": "export", "name": "pruned"},
    ]
    metrics = run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False)
    model, info = load_artifact(tmp_path / "out" / "pruned.safetensors")
    weights = sum(m.numel() for m in info.masks.values())
    pruned = sum(int((~m).sum()) for m in info.masks.values())
    assert pruned == round(0.8 * weights)  # exact, one global count
    assert metrics["rounds"][-1]["targeted_sparsity"] >= pruned / weights - 1e-9
    assert all(gate_of(m) is None for m in model.modules())
    for name, mask in info.masks.items():
        assert torch.all(model.get_submodule(name).weight[~mask] == 0)
