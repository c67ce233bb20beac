"""Lottery tickets: rewinding restores exactly the saved weights, pruned weights are zero, the sparsity is
the target, and the ticket trains in isolation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from fixtures.models import mlp as shared_mlp
from prunekit.errors import PrunekitError
from prunekit.lottery import Ticket, capture_state, find_ticket, load_plain_state
from prunekit.masking import apply_masks, get_masks, weight_parameter
from prunekit.schedule import geometric_rounds

LAYERS = ("0", "2")  # "4" is the classifier: dense by default


def mlp(seed: int = 0) -> nn.Sequential:
    return shared_mlp((10, 32, 32, 2), seed)


def problem(n: int = 128, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A linearly separable two-class problem."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    w = torch.randn(10, generator=gen)
    return x, (x @ w > 0).long()


X, Y = problem()


def loss_of(model: nn.Module) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), Y))


def sgd(model: nn.Module, steps: int, lr: float = 0.1) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        optimizer.step()


class Recorder:
    """A train function that records the masks it saw and checks they stay zero while it trains."""

    def __init__(self, steps: int = 15) -> None:
        self.steps = steps
        self.masks: list[dict[str, torch.Tensor]] = []

    def __call__(self, model: nn.Module) -> None:
        masks = get_masks(model)
        self.masks.append(masks)
        sgd(model, self.steps)
        for name, mask in masks.items():
            assert torch.all(model.get_submodule(name).weight[~mask] == 0)


def dead(masks: dict[str, torch.Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks.values())


def assert_rewound(ticket: Ticket, saved: dict[str, torch.Tensor]) -> None:
    assert set(ticket.weights) == set(saved)
    for key, value in saved.items():
        name = key[: -len(".weight")]
        if key.endswith(".weight") and name in ticket.masks:
            keep = ticket.masks[name]
            assert torch.equal(ticket.weights[key][keep], value[keep]), key
            assert torch.all(ticket.weights[key][~keep] == 0), key
        else:
            assert torch.equal(ticket.weights[key], value), key


# -- rewinding, sparsity, rounds ---------------------------------------------------------------------------


def test_rewind_to_init_restores_kept_weights_exactly_and_zeroes_the_rest():
    model = mlp()
    init = capture_state(model)
    ticket = find_ticket(model, Recorder(), target=0.8, rate=0.3)
    assert set(ticket.masks) == set(LAYERS)
    assert_rewound(ticket, init)
    # the model itself is left masked and rewound
    assert all(torch.equal(a, ticket.weights[k]) for k, a in capture_state(model).items())
    assert all(torch.equal(get_masks(model)[n], ticket.masks[n]) for n in LAYERS)
    # no parametrization keys in the ticket's weights
    assert not any("parametrizations" in key for key in ticket.weights)


def test_final_sparsity_is_the_target_and_rounds_follow_the_schedule():
    model = mlp()
    train = Recorder()
    ticket = find_ticket(model, train, target=0.9, rate=0.4)
    schedule = geometric_rounds(0.9, 0.4)
    total = sum(m.numel() for m in ticket.masks.values())
    assert abs(dead(ticket.masks) - round(0.9 * total)) <= len(LAYERS)  # one global threshold
    assert ticket.sparsity == pytest.approx(dead(ticket.masks) / total)
    assert len(ticket.rounds) == len(schedule) == len(train.masks)
    for reached, planned in zip(ticket.rounds, schedule, strict=True):
        assert abs(reached - planned) <= len(LAYERS) / total
    assert ticket.rounds[-1] == ticket.sparsity
    # each round trained with the masks of the previous one, and masks only shrink
    assert dead(train.masks[0]) == 0
    seen = [*train.masks, ticket.masks]
    for before, after in zip(seen, seen[1:], strict=False):
        for name in LAYERS:
            assert not torch.any(after[name] & ~before[name])
    # the classifier stays dense
    assert "4" not in ticket.masks and not parametrize.is_parametrized(model[4])


def test_layer_group_prunes_each_layer_to_the_target():
    ticket = find_ticket(mlp(), Recorder(5), target=0.7, rate=0.5, group="layer")
    for mask in ticket.masks.values():
        assert abs(int((~mask).sum()) - round(0.7 * mask.numel())) <= 1


@settings(max_examples=8, deadline=None)
@given(target=st.floats(0.1, 0.95), rate=st.floats(0.2, 0.9), seed=st.integers(0, 100))
def test_ticket_invariants_hold_for_any_target_and_rate(target, rate, seed):
    model = mlp(seed)
    init = capture_state(model)

    def shake(m: nn.Module) -> None:  # "training" that moves every weight, masked originals included
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))

    ticket = find_ticket(model, shake, target=target, rate=rate)
    total = sum(m.numel() for m in ticket.masks.values())
    assert abs(dead(ticket.masks) - round(target * total)) <= len(LAYERS)
    assert_rewound(ticket, init)
    assert len(ticket.rounds) == len(geometric_rounds(target, rate))


def test_rewinding_to_a_state_captured_at_step_k():
    model = mlp()
    init = capture_state(model)
    sgd(model, 5)  # k = 5 steps of the first training run, done by the user
    at_k = capture_state(model)
    assert not torch.equal(at_k["0.weight"], init["0.weight"])
    ticket = find_ticket(model, Recorder(10), target=0.6, rate=0.5, rewind_state=at_k)
    assert_rewound(ticket, at_k)


def test_first_round_trains_from_the_given_model_later_rounds_from_the_rewind_point():
    model = mlp()
    init = capture_state(model)
    sgd(model, 10)  # e.g. a dense model trained already: round one continues from it
    trained = capture_state(model)
    starts = []

    def train(m: nn.Module) -> None:
        starts.append((capture_state(m), get_masks(m)))
        sgd(m, 5)

    find_ticket(model, train, target=0.75, rate=0.5, rewind_state=init)
    assert len(starts) == 2
    assert all(torch.equal(starts[0][0][k], trained[k]) for k in trained)
    state, masks = starts[1]
    for key in init:
        name = key[: -len(".weight")]
        expected = torch.where(masks[name], init[key], 0.0) if name in masks else init[key]
        assert torch.equal(state[key], expected), key


def test_rewind_state_may_be_a_raw_state_dict_of_a_masked_model():
    model = mlp()
    apply_masks(model, {"0": torch.rand(32, 10) > 0.2})
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        weight_parameter(model[0]).add_(1.0)  # a stale original must not leak through the mask
    plain = capture_state(model)
    assert "0.weight" in plain and not any("parametrizations" in k for k in plain)
    ticket = find_ticket(model, Recorder(5), target=0.5, rate=0.5, rewind_state=raw)
    keep = ticket.masks["0"]
    assert torch.equal(ticket.weights["0.weight"][keep], raw["0.parametrizations.weight.original"][keep])
    assert torch.all(ticket.weights["0.weight"][~keep] == 0)
    # the earlier mask was respected: masks only shrink
    assert not torch.any(keep & ~raw["0.parametrizations.weight.0.mask"])


def test_random_criterion_is_the_reproducible_control():
    a = find_ticket(mlp(), Recorder(3), 0.5, 0.5, criterion="random", seed=4)
    b = find_ticket(mlp(), Recorder(3), 0.5, 0.5, criterion="random", seed=4)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in LAYERS)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


# -- the ticket in isolation -------------------------------------------------------------------------------


def test_ticket_trains_in_isolation_with_masks_staying_zero():
    model = mlp()
    ticket = find_ticket(model, Recorder(20), target=0.7, rate=0.5)
    fresh = ticket.apply(mlp(seed=42))  # another initialisation of the same architecture
    assert all(torch.equal(get_masks(fresh)[n], ticket.masks[n]) for n in LAYERS)
    assert torch.equal(fresh(X), model(X))  # it is the rewound sub-network
    before = loss_of(fresh)
    sgd(fresh, 30)
    assert loss_of(fresh) < 0.7 * before
    for name, mask in ticket.masks.items():
        assert torch.all(fresh.get_submodule(name).weight[~mask] == 0)
        assert int((fresh.get_submodule(name).weight == 0).sum()) == int((~mask).sum())


def test_apply_on_the_same_model_is_idempotent_and_resets_training():
    model = mlp()
    ticket = find_ticket(model, Recorder(5), target=0.5, rate=0.5)
    sgd(model, 5)
    ticket.apply(model)
    ticket.apply(model)
    assert all(torch.equal(a, ticket.weights[k]) for k, a in capture_state(model).items())
    assert all(torch.equal(get_masks(model)[n], ticket.masks[n]) for n in LAYERS)


def test_capture_state_is_a_detached_cpu_copy_of_effective_weights():
    model = mlp()
    mask = torch.rand(32, 10) > 0.5
    apply_masks(model, {"0": mask})
    state = capture_state(model)
    assert set(state) == set(mlp().state_dict())  # plain keys
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    assert torch.all(state["0.weight"][~mask] == 0)
    snapshot = state["2.weight"].clone()
    sgd(model, 2)
    assert torch.equal(state["2.weight"], snapshot)


def test_load_plain_state_into_unmasked_and_masked_models():
    source = mlp(1)
    state = capture_state(source)
    plain = mlp(2)
    load_plain_state(plain, state)
    assert torch.equal(plain(X), source(X))
    masked = mlp(3)
    mask = torch.rand(32, 32) > 0.5
    apply_masks(masked, {"2": mask})
    original = weight_parameter(masked[2])
    load_plain_state(masked, state)
    assert weight_parameter(masked[2]) is original  # the optimizer's tensor is kept
    assert torch.equal(masked[2].weight, torch.where(mask, state["2.weight"], 0.0))
    assert torch.all(original[~mask] == 0)


# -- errors ------------------------------------------------------------------------------------------------


def never(model: nn.Module) -> None:
    raise AssertionError("training must not start on bad arguments")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 1.0}, "target sparsity"),
        ({"target": -0.2}, "target sparsity"),
        ({"target": "0.5"}, "target sparsity"),
        ({"target": 0.5, "rate": 0.0}, "rate"),
        ({"target": 0.5, "rate": 1.0}, "rate"),
        ({"target": 0.5, "group": "glob"}, "comparison group"),
        ({"target": 0.5, "criterion": "wanda"}, "weights only"),
        ({"target": 0.5, "criterion": "magnitud"}, "did you mean 'magnitude'"),
    ],
)
def test_bad_arguments_raise_before_training(kwargs, match):
    with pytest.raises(PrunekitError, match=match):
        find_ticket(mlp(), never, **kwargs)


def test_rewind_state_of_another_architecture_raises_before_training():
    other = capture_state(
        nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    )
    with pytest.raises(PrunekitError, match="shape"):
        find_ticket(mlp(), never, 0.5, rewind_state=other)
    missing = {k: v for k, v in capture_state(mlp()).items() if k != "2.bias"}
    with pytest.raises(PrunekitError, match="2.bias"):
        find_ticket(mlp(), never, 0.5, rewind_state=missing)
    extra = {**capture_state(mlp()), "9.weight": torch.zeros(1)}
    with pytest.raises(PrunekitError, match="9.weight"):
        find_ticket(mlp(), never, 0.5, rewind_state=extra)


def test_train_must_be_callable():
    with pytest.raises(PrunekitError, match="train"):
        find_ticket(mlp(), None, 0.5)
