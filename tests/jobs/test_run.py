"""Recipe runs: every prune stage is checked against the model before any stage runs, AGP stages work with
every criterion and reach their target, and rounds are numbered in order."""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import numpy as np
import pytest
import yaml

from prunekit.cli.commands import main
from prunekit.errors import PrunekitError
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"builtin": "resnet-digits", "args": {"widths": [8, 16], "blocks": 1}},
    "data": {"name": "digits", "batch_size": 128},  # 1,078 training images: 9 steps per epoch
    "stages": [
        {"type": "train", "epochs": 1, "lr": 0.05},
        {"type": "export", "name": "dense"},
        {"type": "prune", "pattern": 0.5},
        {"type": "evaluate", "label": "pruned", "latency_runs": 2, "latency_warmup": 0},
    ],
}
STEPS_PER_EPOCH = 9


def with_prune(**fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(TINY)
    data["stages"][2] = {"type": "prune", "pattern": 0.5, **fields}
    return data


AGP = {"schedule": {"type": "agp", "end": 6, "every": 2}, "finetune": {"epochs": 1, "lr": 0.01}}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"pattern": "2:4", "targets": {"include": ["stem.*", "layer*"]}},
            "layer 'stem.0': N:M 2:4 needs the input dimension (1) to be a multiple of M=4; the targets "
            "name it (include ['stem.*', 'layer*']): leave it out with exclude=['stem.0']",
        ),
        ({"pattern": "block:3x3@0.5", "overrides": {"stem.*": "block:3x3@0.5"}}, "block 3x3 does not divide"),
        ({"pattern": "block:1x8@0.5", "group": "row", "targets": {"exclude": ["stem.*"]}}, "not per row"),
        ({"targets": {"types": ["Conv2D"]}}, "type 'Conv2D' is neither"),
        ({"targets": {"include": ["decoder.*"]}}, "no layer matches the targets"),
        ({"overrides": {"head.*": 0.9}}, "match no targeted layer"),
        ({**AGP, "schedule": {"type": "agp", "end": 6, "initial": 0.8}}, "AGP initial sparsity 0.8"),
        ({**AGP, "schedule": {"type": "agp", "end": STEPS_PER_EPOCH}}, "end=9 is never reached"),
    ],
)
def test_a_prune_stage_that_cannot_work_fails_before_anything_runs(tmp_path, fields, needle):
    out = tmp_path / "out"
    started = time.perf_counter()
    with pytest.raises(PrunekitError) as info:
        run_recipe(recipe.from_dict(with_prune(**fields)), out, progress=False)
    message = str(info.value)
    assert message.startswith("recipe tiny: stages[2]: ") and needle in message, message
    assert "\n" not in message
    assert not out.exists()  # not even the dense artifact of the stage before: nothing was run
    assert time.perf_counter() - started < 20  # no training happened (it takes seconds even when tiny)


def test_the_cli_exits_2_on_a_stage_that_cannot_work(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.yaml"
    bad = with_prune(pattern="2:4", targets={"include": ["stem.*"]})  # names a layer 2:4 cannot apply to
    path.write_text(yaml.safe_dump(bad), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["prunekit", "run", str(path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: recipe tiny: stages[2]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda", "movement"])
def test_agp_stage_runs_with_every_kind_of_criterion_and_reaches_its_target(tmp_path, criterion):
    data = with_prune(criterion=criterion, group="layer", calibration_batches=2, **AGP)
    metrics = run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False)
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    layers = [r for r in metrics["pruned"]["layers"] if r["pattern"] != "dense"]
    for row in layers:  # the layer group: each layer at the target, to one weight
        assert abs((row["params"] - row["nonzero"]) - round(0.5 * row["params"])) <= 1, row
    assert metrics["rounds"][1]["targeted_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_rounds_are_numbered_in_order_across_prune_stages(tmp_path):
    data = copy.deepcopy(TINY)
    data["stages"][2] = {"type": "prune", "pattern": 0.3}
    data["stages"].insert(
        3, {"type": "prune", "pattern": 0.6, "schedule": {"type": "iterative", "rate": 0.3}}
    )
    metrics = run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(len(rounds))) and len(rounds) == 5
    targeted = [r["targeted_sparsity"] for r in rounds]
    assert targeted == sorted(targeted) and targeted[-1] == pytest.approx(0.6, abs=1e-3)


def test_data_the_model_cannot_take_fails_before_anything_runs(tmp_path):
    rng = np.random.default_rng(0)
    flat = tmp_path / "flat.npz"  # feature vectors, not images: resnet-digits cannot take them
    np.savez(flat, x=rng.normal(size=(90, 10)).astype(np.float32), y=np.arange(90) % 3)
    data = copy.deepcopy(TINY)
    data["data"] = {"name": "npz", "path": str(flat)}
    with pytest.raises(PrunekitError, match=r"does not take the data's samples of shape \(10,\)") as info:
        run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_artifact_with_other_classes_than_the_data_fails_before_anything_runs(tmp_path):
    first = run_recipe(recipe.from_dict(TINY), tmp_path / "first", progress=False)  # 10 digit classes
    assert first["pruned"]["accuracy"] >= 0
    images = tmp_path / "three.npz"
    rng = np.random.default_rng(1)
    np.savez(images, x=rng.normal(size=(90, 1, 8, 8)).astype(np.float32), y=np.arange(90) % 3)
    data = copy.deepcopy(TINY)
    data["model"] = {"artifact": str(tmp_path / "first" / "dense.safetensors")}
    data["data"] = {"name": "npz", "path": str(images)}
    with pytest.raises(PrunekitError, match=r"one logit per class.*3 classes; got \(1, 10\)"):
        run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_pattern_skips_the_first_layer_it_cannot_apply_to_and_says_so(tmp_path):
    """The README's "2:4" on a CNN whose first layer has 1 input channel: that layer stays dense, with the
    reason in metrics.json and the report; every other targeted layer is 2:4."""
    metrics = run_recipe(recipe.from_dict(with_prune(pattern="2:4")), tmp_path / "out", progress=False)
    reason = metrics["left_dense"]["stem.0"]
    assert reason.startswith("pattern 2:4 cannot apply: N:M 2:4 needs the input dimension (1)")
    assert f"`stem.0`: {reason}" in (tmp_path / "out" / "report.md").read_text()
    assert metrics["rounds"][-1]["targeted_sparsity"] == 0.5  # exactly 2 of every 4 in the pruned layers
