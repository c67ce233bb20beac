"""Sensitivity analysis: the model comes back bit for bit, each value is the metric of the model with that one
layer pruned (checked by hand), curves of a trained model rise with sparsity, and the outputs round-trip."""

from __future__ import annotations

import copy
import csv
import io
import json
import math

import pytest
import torch
from torch import nn

from prunekit.analysis.sensitivity import (
    DEFAULT_GRID,
    Metric,
    Sensitivity,
    accuracy,
    heatmap_png,
    mean_loss,
    sensitivity_analysis,
    write_csv,
    write_heatmap,
    write_json,
)
from prunekit.data import load_splits
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks
from prunekit.select import unstructured_masks


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on digits for a few hundred steps (about a second), and validation batches."""
    torch.manual_seed(0)
    data = load_splits("digits", seed=0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = data.loader("train", 128, shuffle=True)
    for _ in range(25):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, list(data.loader("val", 64))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_the_model_is_bit_identical_afterwards_masked_or_not(trained):
    model, val = trained
    model = copy.deepcopy(model)
    model.train()
    before = _state(model)
    result = sensitivity_analysis(model, val)
    assert _same(before, _state(model)) and model.training
    assert [c.name for c in result.layers] == ["1", "3"]  # the classifier "5" stays dense by default
    # with a mask already attached (a model from an earlier prune stage): original and mask both restored
    mask = torch.rand(model[1].weight.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    apply_masks(model, {"1": mask})
    before = _state(model)
    sensitivity_analysis(model, val, sparsities=(0.1, 0.5, 0.9))
    assert _same(before, _state(model))


def test_each_value_is_the_metric_with_that_layer_alone_pruned(trained):
    model, val = trained
    result = sensitivity_analysis(copy.deepcopy(model), val, sparsities=(0.3, 0.8))
    assert result.baseline == accuracy(model, val)
    for layer, s, value in (("3", 0.8, result.layer("3").values[1]), ("1", 0.3, result.layer("1").values[0])):
        pruned = copy.deepcopy(model)
        w = pruned.get_submodule(layer).weight
        keep = unstructured_masks({layer: w.detach().abs()}, s, "layer")[layer]
        assert int((~keep).sum()) == round(s * w.numel())
        with torch.no_grad():
            w.mul_(keep)
        assert value == accuracy(pruned, val)
    assert result.samples == sum(len(y) for _, y in val)
    assert result.layer("1").params == 64 * 48 and result.layer("3").params == 48 * 32


def test_curves_of_a_trained_model_rise_with_sparsity(trained):
    model, val = trained
    result = sensitivity_analysis(copy.deepcopy(model), val)
    assert result.sparsities == DEFAULT_GRID
    for c in result.layers:
        drops = result.drops(c.name)
        assert drops[-1] > 0.05 and drops[-1] >= max(drops[:3])  # 95% alone hurts; 10-30% barely does
        assert min(drops[:3]) > -0.03  # "monotone enough": early noise is a couple of samples at most


def test_loss_and_a_custom_metric_plug_in(trained):
    model, val = trained
    loss = sensitivity_analysis(copy.deepcopy(model), val, metric="loss", sparsities=(0.5, 0.95))
    assert not loss.higher_is_better and loss.baseline == pytest.approx(mean_loss(model, val))
    assert loss.drops("1") == tuple(v - loss.baseline for v in loss.layer("1").values)
    assert loss.drops("1")[-1] > 0

    def perplexity(m, batches):
        return math.exp(mean_loss(m, batches))

    ppl = sensitivity_analysis(
        copy.deepcopy(model), val, metric=Metric("perplexity", perplexity, False), sparsities=(0.5, 0.95)
    )
    assert ppl.layer("3").values == pytest.approx(tuple(math.exp(v) for v in loss.layer("3").values))


def test_a_data_criterion_scores_from_calibration_and_still_restores(trained):
    model, val = trained
    model = copy.deepcopy(model)
    before = _state(model)
    result = sensitivity_analysis(
        model,
        val,
        criterion="taylor",
        calibration=val[:2],
        loss_fn=nn.CrossEntropyLoss(),
        sparsities=(0.5, 0.9),
    )
    assert _same(before, _state(model)) and all(p.grad is None for p in model.parameters())
    assert result.criterion == "taylor" and len(result.layers) == 2


def test_bad_requests_are_one_line_errors(trained):
    model, val = trained
    with pytest.raises(PrunekitError, match="scores weights while they train"):
        sensitivity_analysis(model, val, criterion="movement")
    with pytest.raises(PrunekitError, match="needs calibration batches"):
        sensitivity_analysis(model, val, criterion="wanda")
    with pytest.raises(PrunekitError, match="increasing sparsities"):
        sensitivity_analysis(model, val, sparsities=(0.5, 0.3))
    with pytest.raises(PrunekitError, match="grid sparsity must be in"):
        sensitivity_analysis(model, val, sparsities=(0.5, 1.0))
    with pytest.raises(PrunekitError, match="unknown sensitivity metric 'acc'"):
        sensitivity_analysis(model, val, metric="acc")
    with pytest.raises(PrunekitError, match="no module named 'fc9'"):
        sensitivity_analysis(model, val, layers=["fc9"])
    with pytest.raises(PrunekitError, match="module '2' has no weight"):
        sensitivity_analysis(model, val, layers=["2"])  # the ReLU


def test_json_csv_and_heat_map_round_trip(trained, tmp_path):
    model, val = trained
    result = sensitivity_analysis(copy.deepcopy(model), val, sparsities=(0.2, 0.6, 0.9), max_batches=2)
    assert result.samples == sum(len(y) for _, y in val[:2])
    write_json(result, tmp_path / "s.json")
    assert Sensitivity.from_dict(json.loads((tmp_path / "s.json").read_text())) == result
    write_csv(result, tmp_path / "s.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text())))
    assert len(rows) == 2 * 3
    assert [float(r["drop"]) for r in rows[:3]] == list(result.drops("1"))
    write_heatmap(result, tmp_path / "s.png", allocation={"1": 0.7, "3": 0.9})
    data = (tmp_path / "s.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == heatmap_png(result, {"1": 0.7, "3": 0.9})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json", "s.png"]  # no temp files left
    table = result.table().splitlines()
    assert len(table) == 2 + 2 and table[2].split()[:2] == ["1", str(64 * 48)]


# ---------------------------------------------------------------------------------- recipes and pipeline

TINY = {
    "name": "tiny-sens",
    "seed": 0,
    "model": {"builtin": "resnet-digits", "args": {"widths": [8, 16], "blocks": 1}},
    "data": {"name": "digits", "batch_size": 128},
    "stages": [
        {"type": "train", "epochs": 2, "lr": 0.05},
        {
            "type": "prune",
            "pattern": 0.8,
            "allocation": "sensitivity",
            "sensitivity": {"grid": [0.5, 0.7, 0.8, 0.9, 0.95], "batches": 2},
            "schedule": {"type": "iterative", "rate": 0.5},  # rounds at 0.5, 0.75, 0.8 of the target
        },
        {"type": "evaluate", "label": "pruned", "latency_runs": 2, "latency_warmup": 0},
        {"type": "export", "name": "pruned"},
    ],
}


def test_a_recipe_with_sensitivity_allocation_meets_the_global_target_exactly(tmp_path):
    from prunekit.artifact import load_artifact
    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    metrics = run_recipe(recipe.from_dict(TINY), tmp_path / "out", progress=False)
    (entry,) = metrics["allocation"]
    layers = entry["layers"]
    _, info = load_artifact(tmp_path / "out" / "pruned.safetensors")
    pruned = {n: int((~m).sum()) for n, m in info.masks.items()}
    sizes = {n: m.numel() for n, m in info.masks.items()}
    assert set(pruned) == set(layers)
    assert sum(pruned.values()) == round(0.8 * sum(sizes.values())) == entry["target_pruned"]
    assert pruned == {n: v["pruned"] for n, v in layers.items()}
    assert len({round(v["sparsity"], 3) for v in layers.values()}) > 1  # layers differ
    assert all(v["sparsity"] <= 0.95 for v in layers.values())
    targeted = [r["targeted_sparsity"] for r in metrics["rounds"]]
    assert targeted[1:] == pytest.approx([0.5, 0.75, 0.8], abs=2e-3)  # the schedule is followed globally
    assert targeted[-1] == sum(pruned.values()) / sum(sizes.values())
    sens = Sensitivity.from_dict(entry["sensitivity"])
    assert sens.sparsities == (0.5, 0.7, 0.8, 0.9, 0.95) and {c.name for c in sens.layers} == set(layers)
    assert (tmp_path / "out" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert {n: s.sparsity for n, s in info.specs.items()} == {n: v["sparsity"] for n, v in layers.items()}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"pattern": "2:4"}, "fixes its own layout"),
        ({"group": "global"}, "use group 'layer' (or leave it out), not 'global'"),
        ({"criterion": "wanda"}, "not 'row'"),  # wanda compares per row by default
        ({"overrides": {"stem.*": 0.5}}, "no 'overrides'"),
        ({"allocation": "uniform"}, "'sensitivity' settings need allocation 'sensitivity'"),
        ({"sensitivity": {"grid": [0.5, 0.4]}}, "grid must be increasing"),
        ({"sensitivity": {"grid": [0.5, 0.9], "max_sparsity": 0.95}}, "beyond the grid"),
        ({"sensitivity": {"grids": [0.5]}}, "unknown key 'grids' (did you mean 'grid'?)"),
    ],
)
def test_recipes_refuse_sensitivity_allocation_that_makes_no_sense(fields, needle):
    from prunekit.jobs import recipe

    data = copy.deepcopy(TINY)
    data["stages"][1] = {**data["stages"][1], **fields}
    with pytest.raises(PrunekitError) as info:
        recipe.from_dict(data)
    assert needle in str(info.value) and str(info.value).startswith("recipe <dict>: stages[1]")


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from prunekit.artifact import save_artifact
    from prunekit.models import build_model

    args = {"widths": [8, 16], "blocks": 1, "in_channels": 1, "num_classes": 10}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("art") / "dense.safetensors"
    save_artifact(
        path, build_model("resnet-digits", args), model_info={"name": "resnet-digits", "args": args}
    )
    return path


def _main(monkeypatch, capsys, *args):
    import sys

    from prunekit.cli.commands import main

    monkeypatch.setattr(sys, "argv", ["prunekit", "analyze", "sensitivity", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def test_the_cli_writes_the_table_files_and_an_exact_allocation(artifact, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sens"
    code, stdout, err = _main(
        monkeypatch, capsys, str(artifact), "--grid", "0.5,0.9", "--batches", "2", "--target", "0.7",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "allocation.json", "sensitivity.csv", "sensitivity.json", "sensitivity.png",
    ]  # fmt: skip
    result = Sensitivity.from_dict(json.loads((out / "sensitivity.json").read_text()))
    plan = json.loads((out / "allocation.json").read_text())
    sizes = result.params()
    assert sum(v["pruned"] for v in plan["layers"].values()) == round(0.7 * sum(sizes.values()))
    assert result.sparsities == (0.5, 0.9) and result.samples == 128  # two batches of 64
    assert result.table().splitlines()[1] in stdout and "allocation for 70.00% overall" in stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--grid", "0.5,x"], "--grid must be numbers separated by commas"),
        (["--grid", "0.9,0.5"], "increasing sparsities"),
        (["--data", "mnist"], "--data must be digits, an .npz file or npz"),
        (["--data", "missing.npz"], "data: file not found: missing.npz"),
        (["--criterion", "magnitud"], "did you mean 'magnitude'"),
        (["--target", "0.97"], "out of reach"),
        (["--target", "1.5"], "--target must be in [0, 1), got 1.5"),
        (["--metric", "acc"], "did you mean 'accuracy'"),
        (["--max-sparsity", "0.9"], "give --target too"),
    ],
)
def test_the_cli_refuses_bad_options_in_one_line(artifact, tmp_path, monkeypatch, capsys, args, needle):
    code, _, err = _main(
        monkeypatch, capsys, str(artifact), "--batches", "1", "--out", str(tmp_path / "o"), *args
    )
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_the_cli_refuses_data_the_model_was_not_made_for(artifact, tmp_path, monkeypatch, capsys):
    import numpy as np

    path = tmp_path / "twelve.npz"  # 12 classes; the model has 10 outputs
    x = np.random.default_rng(0).random((120, 1, 8, 8), dtype=np.float32)
    np.savez(path, x=x, y=np.arange(120) % 12)
    code, _, err = _main(
        monkeypatch,
        capsys,
        str(artifact),
        "--data",
        "npz",
        "--data-path",
        str(path),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "one logit per class, shape (batch, 12)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_cli_refuses_an_out_it_cannot_create_in_one_line(artifact, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _main(
        monkeypatch, capsys, str(artifact), "--batches", "1", "--out", str(tmp_path / "file" / "o")
    )
    assert code == 2 and "--out " in err and "cannot create the directory" in err, err
    assert len(err.strip().splitlines()) == 1, err
