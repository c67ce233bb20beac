"""Latency-aware structured allocation: the pure knapsack against brute force, and a fast end-to-end run
on a tiny model (no timing assertions: the tables are measured, so only their structure is checked)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.allocate.latency import (
    GroupTable,
    Option,
    allocate,
    predict,
    prune_for_latency,
    resolve_budget,
)
from prunekit.errors import PrunekitError
from prunekit.jobs.recipe import from_dict
from prunekit.models import SmallResNet


def _tables(spec: list[list[tuple[float, float]]], base: float) -> list[GroupTable]:
    out = []
    for g, options in enumerate(spec):
        opts = [Option(0.0, 8, base, 0.0)]
        opts += [Option((i + 1) / 10, 8, ms, loss) for i, (ms, loss) in enumerate(options)]
        out.append(GroupTable(f"g{g}", 8, opts))
    return out


def _brute_force(tables, base, budget):
    best = None
    for picks in itertools.product(*[range(len(t.options)) for t in tables]):
        choice = {t.name: i for t, i in zip(tables, picks)}
        ms, loss = predict(tables, base, choice)
        if ms <= budget * (1 + 1e-9) and (best is None or loss < best - 1e-12):
            best = loss
    return best


option = st.tuples(st.floats(0.5, 12.0), st.floats(0.0, 5.0))


@settings(max_examples=150, deadline=None)
@given(
    spec=st.lists(st.lists(option, min_size=1, max_size=3), min_size=1, max_size=4),
    fraction=st.floats(0.3, 1.0),
)
def test_allocation_meets_the_budget_with_the_least_loss_of_any_choice(spec, fraction):
    base = 10.0
    tables = _tables(spec, base)
    budget = base * fraction
    choice, result = allocate(tables, base, budget)
    ms, loss = predict(tables, base, choice)
    assert ms == pytest.approx(result.predicted_ms) and loss == pytest.approx(result.predicted_loss)
    assert result.ratios == {t.name: t.options[choice[t.name]].ratio for t in tables}
    best = _brute_force(tables, base, budget)
    if best is None:  # nothing fits: the fastest predicted choice, flagged
        assert not result.feasible
        fastest = min(
            predict(tables, base, {t.name: i for t, i in zip(tables, p)})[0]
            for p in itertools.product(*[range(len(t.options)) for t in tables])
        )
        assert ms == pytest.approx(fastest)
    else:
        assert result.feasible and ms <= budget * (1 + 1e-9)
        assert loss == pytest.approx(best, abs=1e-9)


def test_a_hand_checked_case_prefers_the_cheap_saving():
    # group a saves 3 ms for loss 1, group b saves 3 ms for loss 5, saving 3 ms is enough
    tables = _tables([[(7.0, 1.0)], [(7.0, 5.0)]], 10.0)
    choice, result = allocate(tables, 10.0, 7.5)
    assert choice == {"g0": 1, "g1": 0} and result.feasible
    assert result.predicted_ms == pytest.approx(7.0) and result.predicted_loss == pytest.approx(1.0)
    # a budget above the base needs no pruning at all
    choice, result = allocate(tables, 10.0, 11.0)
    assert choice == {"g0": 0, "g1": 0} and result.predicted_loss == 0.0


def test_thinned_states_still_meet_the_budget():
    spec = [[(10.0 - 0.3 * (i + 1), 0.1 * (i + 1) * (g + 1)) for i in range(3)] for g in range(8)]
    tables = _tables(spec, 10.0)
    choice, result = allocate(tables, 10.0, 6.0, max_states=5)
    assert not result.exact and result.feasible
    assert predict(tables, 10.0, choice)[0] <= 6.0
    exact_choice, exact = allocate(tables, 10.0, 6.0)
    assert exact.exact and exact.predicted_loss <= result.predicted_loss + 1e-12


def test_budget_forms_and_errors():
    assert resolve_budget(0.6, 5.0) == pytest.approx(3.0)
    assert resolve_budget("2.5ms", 5.0) == pytest.approx(2.5)
    assert resolve_budget(" 4 MS ", 5.0) == pytest.approx(4.0)
    for bad in (0.0, 1.5, -1, "fast", "xms", "-2ms", True):
        with pytest.raises(PrunekitError, match="target_latency"):
            resolve_budget(bad, 5.0)
    with pytest.raises(PrunekitError, match="no prunable group"):
        allocate([], 1.0, 1.0)


def test_prune_for_latency_on_a_tiny_model():
    torch.manual_seed(0)
    model = SmallResNet(widths=[8, 16], blocks=1).eval()
    x = torch.randn(2, 1, 8, 8)
    before = model(x).detach()
    result, report = prune_for_latency(
        model, x, 0.9, x[:1], grid=(0.5,), runs=5, warmup=1, passes=2, round_to=4
    )
    groups = report["tables"]["groups"]
    assert groups and set(report["ratios"]) == {g["name"] for g in groups}
    for g in groups:
        assert g["options"][0]["ratio"] == 0.0 and g["options"][0]["loss"] == 0.0
        for o in g["options"]:
            assert o["keep"] % 4 == 0 and o["loss"] >= 0.0
        assert report["ratios"][g["name"]] in {o["ratio"] for o in g["options"]}
    # the pruned model has the kept counts the report names, and the same output shape
    for name, keep in report["kept"].items():
        assert model.get_submodule(name).out_channels == keep
    assert model(x).shape == before.shape
    assert result.max_abs_diff is not None  # verified against the masked original
    assert report["target_met"] == (report["measured_ratio"] <= 0.9)
    assert report["budget_ms"] == pytest.approx(0.9 * report["dense_ms"])
    # the closed loop: the first attempt aims at the goal, each retry lower by the measured miss, and it
    # stops at the first attempt that meets the goal; the kept one is that, else the fastest measured
    attempts = report["attempts"]
    assert 1 <= len(attempts) <= 3 and attempts[0]["aim_ratio"] == pytest.approx(0.9)
    for before, after in zip(attempts, attempts[1:]):
        assert before["measured_ratio"] > 0.9
        lowered = min(
            before["aim_ratio"] - (before["measured_ratio"] - 0.9), before["predicted_ratio"] - 1e-9
        )
        assert after["aim_ratio"] == pytest.approx(lowered)
        assert after["ratios"] != before["ratios"]
    kept = next((a for a in attempts if a["measured_ratio"] <= 0.9), None)
    kept = kept or min(attempts, key=lambda a: a["measured_ratio"])
    assert report["ratios"] == kept["ratios"] and report["measured_ratio"] == kept["measured_ratio"]


STRUCTURED = {"type": "structured", "importance": "l2"}


def _recipe(stage: dict):
    return from_dict({"model": {"builtin": "resnet-digits"}, "stages": [{**STRUCTURED, **stage}]})


def test_recipe_fields_are_validated():
    stage = _recipe({"allocation": "latency", "target_latency": 0.6}).stages[0]
    assert stage.allocation == "latency" and stage.target_latency == 0.6 and stage.ratio is None
    assert _recipe({"allocation": "latency", "target_latency": "3ms"}).stages[0].target_latency == "3ms"
    assert _recipe({"ratio": 0.5}).stages[0].allocation == "uniform"
    cases = [
        ({"allocation": "latency"}, "needs 'target_latency'"),
        ({"allocation": "latency", "target_latency": 0.6, "ratio": 0.5}, "remove 'ratio'"),
        ({"allocation": "latency", "target_latency": 1.7}, r"in \(0, 1\]"),
        ({"allocation": "latency", "target_latency": "soon"}, "target_latency"),
        ({"allocation": "latency", "target_latency": 0.5, "latency_grid": [0.0]}, "latency_grid"),
        ({"ratio": 0.5, "target_latency": 0.6}, "for allocation 'latency'"),
        ({}, "needs 'ratio'"),
        ({"allocation": "knapsack", "ratio": 0.5}, "allocation"),
    ]
    for fields, message in cases:
        with pytest.raises(PrunekitError, match=message):
            _recipe(fields)


def test_builtin_latency_recipe_is_the_structured_one_with_a_latency_stage():
    import yaml

    from prunekit.jobs import recipe

    latency = yaml.safe_load(recipe.builtin_text("edge-digits-latency"))
    uniform = yaml.safe_load(recipe.builtin_text("edge-digits-structured"))
    assert [s["type"] for s in latency["stages"]] == [s["type"] for s in uniform["stages"]]
    assert latency["model"] == uniform["model"] and latency["data"] == uniform["data"]
    stage = recipe.load_builtin("edge-digits-latency").stages[3]
    assert stage.allocation == "latency" and stage.target_latency == 0.8 and stage.ratio is None


def test_pipeline_records_the_allocation(tmp_path):
    from prunekit.jobs.run import run_recipe

    recipe = from_dict(
        {
            "threads": 1,
            "model": {"builtin": "resnet-digits", "args": {"widths": [8, 16], "blocks": 1}},
            "stages": [
                {"type": "train", "epochs": 1, "lr": 0.05},
                {"type": "evaluate", "label": "dense", "latency_runs": 5, "latency_warmup": 1},
                {
                    **STRUCTURED,
                    "allocation": "latency",
                    "target_latency": 0.8,
                    "latency_grid": [0.5],
                    "latency_runs": 5,
                    "latency_passes": 1,
                    "round_to": 4,
                },
                {"type": "evaluate", "label": "pruned", "latency_runs": 5, "latency_warmup": 1},
            ],
        }
    )
    metrics = run_recipe(recipe, tmp_path, progress=False)
    la = metrics["latency_allocation"]
    for key in ("budget_ms", "predicted_ms", "measured_ms", "ratios", "kept", "tables", "target_met"):
        assert key in la
    assert la["budget_ms"] == pytest.approx(0.8 * la["dense_ms"])
    assert metrics["pruned"]["params"] <= metrics["dense"]["params"]
    assert (metrics["pruned"]["params"] < metrics["dense"]["params"]) == any(la["ratios"].values())


@pytest.mark.slow  # the built-in recipe, shrunk, with fine-tuning and exports: ~10-60 s on the shared machine
def test_builtin_latency_recipe_runs_and_its_artifact_replays(tmp_path):
    import json

    import yaml

    from prunekit.analysis import evaluate
    from prunekit.artifact import load_artifact
    from prunekit.data import load_splits
    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    data = yaml.safe_load(recipe.builtin_text("edge-digits-latency"))
    data["model"]["args"] = {"widths": [8, 16], "blocks": 1}
    data["stages"][0]["epochs"] = 1
    data["stages"][3].update(
        {"latency_grid": [0.5], "latency_runs": 5, "latency_passes": 1, "round_to": 4, "target_latency": 0.8}
    )
    data["stages"][3]["finetune"]["epochs"] = 1
    for i in (1, 4):
        data["stages"][i]["latency_runs"] = 5
    metrics = run_recipe(recipe.from_dict(data), tmp_path, progress=False)
    la = metrics["latency_allocation"]
    for key in ("budget_ms", "predicted_ms", "measured_ms", "ratios", "kept", "tables", "target_met"):
        assert key in la
    assert la["budget_ms"] == pytest.approx(0.8 * la["dense_ms"])
    assert la == json.loads((tmp_path / "metrics.json").read_text())["latency_allocation"]
    assert metrics["pruned"]["params"] <= metrics["dense"]["params"]
    assert (metrics["pruned"]["params"] < metrics["dense"]["params"]) == any(la["ratios"].values())
    # the exported artifact replays the chosen removal: same kept counts, same accuracy
    model, _ = load_artifact(tmp_path / "pruned.safetensors")
    for name, keep in la["kept"].items():
        assert model.get_submodule(name).out_channels == keep
    splits = load_splits("digits", seed=0)
    assert evaluate(model.eval(), splits.loader("test", 64), 10)["accuracy"] == metrics["pruned"]["accuracy"]


def test_closed_loop_corrects_an_optimistic_prediction(monkeypatch):
    """With 'measurements' always 0.1 of dense slower than predicted, the loop retries at lower aims and
    keeps the first choice that truly meets the goal (pruning and timing are faked: no clock involved)."""
    from prunekit.allocate import latency

    spec = [[(10.0 - 1.5 * (i + 1), 0.1 * (i + 1) * (g + 1)) for i in range(3)] for g in range(3)]
    tables = latency.Tables(10.0, 10.0, _tables(spec, 10.0), runs=1, threads=1)
    predicted = []
    real_allocate = latency.allocate

    def recording_allocate(*args, **kwargs):
        choice, alloc = real_allocate(*args, **kwargs)
        predicted.append(alloc.predicted_ms / 10.0)
        return choice, alloc

    def fake_pairs(pairs, inputs, runs, warmup, passes=3):
        ratio = predicted[-1] + 0.1
        return {"pruned": ratio}, {"pruned": 10.0}, {"pruned": 10.0 * ratio}

    monkeypatch.setattr(latency, "allocate", recording_allocate)
    monkeypatch.setattr(latency, "paired_ratios", fake_pairs)
    monkeypatch.setattr(latency, "prune_model", lambda *args, **kwargs: None)
    best, attempts = latency.closed_loop(torch.nn.Identity(), None, tables, 0.7, None, refine=4)
    assert len(attempts) >= 2 and attempts[0]["measured_ratio"] > 0.7
    assert best["measured_ratio"] <= 0.7 + 1e-12
    assert best is next(a for a in attempts if a["measured_ratio"] <= 0.7 + 1e-12)
    assert all(b["aim_ratio"] < a["aim_ratio"] for a, b in zip(attempts, attempts[1:]))
    assert all(b["ratios"] != a["ratios"] for a, b in zip(attempts, attempts[1:]))
