"""Measurements: classification metrics against a hand count, parameter counts on effective (masked)
weights, the per-layer table, and latency statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.analysis import (
    classification_metrics,
    compare_latency,
    count_params,
    evaluate,
    layer_table,
    measure_latency,
)
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks, squash
from prunekit.models import SmallResNet
from prunekit.spec import Unstructured

# ------------------------------------------------------------------------------------------------ metrics


def test_classification_metrics_by_hand():
    # class 0: 3 samples, 2 right; class 1: 2 samples, 2 right; class 2: none; class 3: 1 sample, wrong
    targets = torch.tensor([0, 0, 0, 1, 1, 3])
    preds = torch.tensor([0, 1, 0, 1, 1, 0])
    m = classification_metrics(preds, targets, num_classes=4)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_recall"] == [pytest.approx(2 / 3), 1.0, None, 0.0]
    # exact ratios of the counts, not float32 means (0.6666666865348816)
    assert m["accuracy"] == 4 / 6 and m["per_class_recall"][0] == 2 / 3
    assert m["support"] == [3, 2, 0, 1]
    assert m["confusion"] == [
        [2, 1, 0, 0],
        [0, 2, 0, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1, max_size=50),
        )
    )
)
def test_classification_metrics_invariants(case):
    num_classes, pairs = case
    targets = torch.tensor([t for t, _ in pairs])
    preds = torch.tensor([p for _, p in pairs])
    m = classification_metrics(preds, targets, num_classes)
    confusion = torch.tensor(m["confusion"])
    assert confusion.shape == (num_classes, num_classes)
    assert int(confusion.sum()) == len(pairs)
    assert (
        m["support"]
        == confusion.sum(dim=1).tolist()
        == torch.bincount(targets, minlength=num_classes).tolist()
    )
    assert m["accuracy"] == pytest.approx(float(confusion.trace()) / len(pairs))
    assert m["accuracy"] == pytest.approx(sum(p == t for t, p in pairs) / len(pairs))
    for c, recall in enumerate(m["per_class_recall"]):
        if m["support"][c] == 0:
            assert recall is None
        else:
            assert 0.0 <= recall <= 1.0
            assert recall == pytest.approx(m["confusion"][c][c] / m["support"][c])
    # accuracy is the support-weighted mean of the recalls
    weighted = sum(r * s for r, s in zip(m["per_class_recall"], m["support"]) if r is not None)
    assert m["accuracy"] == pytest.approx(weighted / len(pairs))


def test_classification_metrics_rejects_indices_outside_the_classes():
    with pytest.raises(PrunekitError, match=r"predictions must be class indices in \[0, 3\)"):
        classification_metrics(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(PrunekitError, match="targets"):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([-1, 1]), 3)


def test_classification_metrics_accepts_any_shape_and_empty_input():
    m = classification_metrics(torch.tensor([[1], [0]]), torch.tensor([[1], [1]]), 2)
    assert m["accuracy"] == 0.5 and m["support"] == [0, 2]
    empty = classification_metrics(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)
    assert empty["accuracy"] == 0.0 and empty["per_class_recall"] == [None, None, None]


def test_evaluate_agrees_with_argmax_over_a_loader():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(37, 4), torch.randint(0, 3, (37,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model.train()
    m = evaluate(model, loader, 3)
    assert model.training  # restored
    with torch.no_grad():
        expected = classification_metrics(model(x).argmax(dim=1), y, 3)
    assert m == expected


# ----------------------------------------------------------------------------------------- param counts


def masked_resnet(seed: int = 0) -> tuple[SmallResNet, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = SmallResNet(widths=[4, 8], blocks=1)
    gen = torch.Generator().manual_seed(seed)
    masks = {
        name: torch.rand(module.weight.shape, generator=gen) > 0.6
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    }
    apply_masks(model, masks)
    return model, masks


def test_count_params_of_a_plain_model_is_numel():
    model = SmallResNet(widths=[4, 8], blocks=1)
    counts = count_params(model)
    numel = sum(p.numel() for p in model.parameters())
    assert counts["params"] == numel
    assert counts["nonzero_params"] == sum(int(torch.count_nonzero(p)) for p in model.parameters())
    assert counts["sparsity"] == pytest.approx(1 - counts["nonzero_params"] / numel)


def test_count_params_counts_masked_zeros_as_zeros():
    plain = SmallResNet(widths=[4, 8], blocks=1)
    model, masks = masked_resnet()
    counts = count_params(model)
    # parametrization does not change the parameter count (originals are not counted twice)
    assert counts["params"] == sum(p.numel() for p in plain.parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    dense_nonzero = sum(int(torch.count_nonzero(p)) for p in plain.parameters())
    assert counts["nonzero_params"] == dense_nonzero - pruned
    assert counts["sparsity"] == pytest.approx(1 - (dense_nonzero - pruned) / counts["params"])
    # squashing makes the zeros permanent without changing any count
    assert count_params(squash(model)) == counts


def test_layer_table_rows():
    model, masks = masked_resnet()
    specs = {name: Unstructured(0.6) for name in masks}
    rows = layer_table(model, specs)
    # one row per weight matrix or kernel (convolutions and the classifier; not norms), in model order
    layers = [
        n
        for n, m in SmallResNet(widths=[4, 8], blocks=1).named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    assert [r["layer"] for r in rows] == layers
    for row in rows:
        module = model.get_submodule(row["layer"])
        assert "Parametrized" not in row["type"]
        assert row["type"] == type(module).__name__.removeprefix("Parametrized")
        assert row["shape"] == list(module.weight.shape)
        assert row["params"] == module.weight.numel()
        assert row["nonzero"] == int(torch.count_nonzero(module.weight))
        assert row["sparsity"] == pytest.approx(1 - row["nonzero"] / row["params"])
        if row["layer"] in masks:
            assert row["type"] == "Conv2d"
            assert row["nonzero"] == int(masks[row["layer"]].sum())
            assert row["pattern"] == str(specs[row["layer"]]) == "unstructured 60%"
        else:
            assert row["pattern"] == "dense" and row["sparsity"] == 0.0
    assert {r["type"] for r in rows} == {"Conv2d", "Linear"}
    assert all(r["pattern"] == "dense" for r in layer_table(model))  # no specs: nothing is claimed


# ----------------------------------------------------------------------------------------------- latency


@pytest.mark.parametrize("runs", [1, 2, 5, 17])
def test_measure_latency_statistics(runs):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    result = measure_latency(model, torch.randn(1, 8), warmup=2, runs=runs)
    assert result["runs"] == runs and result["warmup"] == 2
    assert 0 < result["p50"] <= result["p99"]
    assert result["p50"] <= result["p99"]
    assert result["mean"] > 0
    assert result["threads"] == torch.get_num_threads() >= 1
    assert model.training  # the mode is restored


def test_measure_latency_counts_calls_and_takes_tuples():
    calls = []

    class Count(nn.Module):
        def forward(self, a, b):
            calls.append(torch.is_inference_mode_enabled())
            return a + b

    measure_latency(Count(), (torch.ones(1), torch.ones(1)), warmup=3, runs=4)
    assert len(calls) == 7 and all(calls)


def test_compare_latency_times_every_model_alike():
    models = {"a": nn.Linear(8, 8).eval(), "b": nn.Sequential(nn.Linear(8, 8), nn.ReLU()).train()}
    stats = compare_latency(models, torch.randn(1, 8), runs=6, warmup=1, blocks=3)
    assert list(stats) == ["a", "b"]
    for entry in stats.values():
        assert entry["runs"] == 6 and 0 < entry["p50"] <= entry["p99"]
    assert stats["a"]["p50_ratio"] == 1.0
    assert stats["b"]["p50_ratio"] == pytest.approx(stats["b"]["p50"] / stats["a"]["p50"])
    assert models["b"].training and not models["a"].training  # each model's mode is restored


@pytest.mark.parametrize(("warmup", "runs"), [(0, 0), (-1, 5)])
def test_measure_latency_rejects_bad_counts(warmup, runs):
    with pytest.raises(ValueError):
        measure_latency(nn.Linear(2, 2), torch.ones(1, 2), warmup=warmup, runs=runs)
