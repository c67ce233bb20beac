"""The quantize stage: strict recipe fields, its place in a pipeline, and one tiny run end to end (prune ->
QAT -> int8 evaluate -> export -> reload to the same accuracy, report with the INT8 findings)."""

from __future__ import annotations

import copy
import logging
import re
import time
from typing import Any

import pytest
import torch

from prunekit.analysis import evaluate
from prunekit.artifact import load_artifact, read_artifact
from prunekit.data import load_splits
from prunekit.errors import PrunekitError
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe
from prunekit.quant.layers import QuantizedConv2d

FAST = {"latency_runs": 3, "latency_warmup": 0}
TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"builtin": "resnet-digits", "args": {"widths": [8, 16], "blocks": 1}},
    "data": {"name": "digits", "batch_size": 128},
    "stages": [
        {"type": "train", "epochs": 1, "lr": 0.05},
        {"type": "prune", "pattern": 0.5},
        {"type": "evaluate", "label": "pruned", **FAST},
        {"type": "export", "name": "pruned"},
        {"type": "quantize", "calibration_batches": 2, "qat": {"epochs": 1, "lr": 0.005}},
        {"type": "evaluate", "label": "pruned-int8", **FAST},
        {"type": "export", "name": "pruned-int8"},
    ],
}


def with_quantize(**fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(TINY)
    data["stages"][4] = {"type": "quantize", **fields}
    return data


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(PrunekitError) as info:
        recipe.from_dict(data)
    message = str(info.value)
    assert "\n" not in message and message.startswith("recipe ")
    return message


def test_quantize_stage_fields_and_defaults():
    stage = recipe.from_dict(with_quantize()).stages[4]
    assert (stage.activations, stage.calibration_batches, stage.classifier, stage.qat) == (
        "static",
        8,
        False,
        None,
    )
    assert recipe.from_dict(TINY).stages[4].qat.epochs == 1


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"activation": "static"}, ["stages[4]", "unknown key 'activation'", "did you mean 'activations'"]),
        ({"activations": "int4"}, ["stages[4].activations", "'static' or 'dynamic'"]),
        ({"calibration_batches": 0}, ["stages[4].calibration_batches", "greater than or equal to 1"]),
        (
            {"qat": {"epoch": 1, "lr": 0.01}},
            ["stages[4].qat", "unknown key 'epoch'", "did you mean 'epochs'"],
        ),
        ({"classifier": "maybe"}, ["stages[4].classifier", "boolean"]),
    ],
)
def test_bad_quantize_fields_are_one_line_errors(fields, needles):
    message = error_of(with_quantize(**fields))
    assert all(n in message for n in needles), message


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda s: s.append({"type": "finetune", "epochs": 1, "lr": 0.01}),
            "stages[7]: a finetune stage cannot",
        ),
        (lambda s: s.insert(5, {"type": "prune", "pattern": 0.6}), "stages[5]: a prune stage cannot follow"),
        (
            lambda s: s[4].update(include=["decoder.*"]),
            "stages[4]: quantize include pattern(s) ['decoder.*']",
        ),
    ],
)
def test_a_quantize_stage_that_cannot_work_fails_before_anything_runs(tmp_path, change, needle):
    data = copy.deepcopy(TINY)
    change(data["stages"])
    started = time.perf_counter()
    with pytest.raises(PrunekitError) as info:
        run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False)
    assert needle in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists() and time.perf_counter() - started < 20


class Rounded(logging.Handler):
    """Collects prunekit.quant.ptq's "int8: <layer>: <n> non-zero weights round to zero" lines: the one
    documented case of a kept weight (mask True) that is a zero of weight_q."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lost: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.fullmatch(r"int8: (.+): (\d+) non-zero weights round to zero", record.getMessage())
        if found:
            self.lost[found[1]] = self.lost.get(found[1], 0) + int(found[2])


def run_logged(data: dict[str, Any], out) -> tuple[dict[str, Any], dict[str, int]]:
    """Run the recipe; returns its metrics and the kept weights each layer's int8 rounding lost (logged)."""
    logger, handler = logging.getLogger("prunekit.quant.ptq"), Rounded()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        return run_recipe(recipe.from_dict(data), out, progress=False), handler.lost
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return (out, *run_logged(TINY, out))


def zeros_match_masks(int8_path, pruned_path, lost: dict[str, int]) -> None:
    """Every pruned weight is a zero of weight_q, and a kept weight is one only as often as conversion
    logged (a weight below half a quantization step of its row rounds to zero)."""
    model, _ = load_artifact(int8_path)
    masks = read_artifact(pruned_path)[1].masks
    assert masks and masks.keys() <= {n for n, m in model.named_modules() if isinstance(m, QuantizedConv2d)}
    for name, mask in masks.items():
        zero = model.get_submodule(name).weight_q == 0
        assert bool(zero[~mask].all()), name  # exactly the pruned positions, and then
        assert int(zero[mask].sum()) == lost.get(name, 0), name  # only the logged kept ones
    assert set(lost) <= set(masks)


def test_the_int8_model_is_evaluated_exported_and_reloads_to_the_same_accuracy(run):
    out, m, lost = run
    q = m["quantization"]
    assert (q["before"], q["after"], q["qat"], q["activations"]) == ("pruned", "pruned-int8", True, "static")
    assert set(q["left_float"]) == {"fc"} and len(q["folded"]) == 6
    entry = m["pruned-int8"]
    assert abs(entry["accuracy"] - m["pruned"]["accuracy"]) <= 0.05 and len(entry["per_class_recall"]) == 10
    assert entry["size_bytes"] == (out / "pruned-int8.safetensors").stat().st_size
    assert entry["size_bytes"] < 0.5 * m["pruned"]["size_bytes"]
    assert [s["type"] for s in entry["recipe"]["stages"]] == ["train", "prune", "quantize"]
    rows = {r["layer"]: r for r in entry["layers"]}
    assert rows["stem.0"]["type"] == "QuantizedConv2d" and rows["fc"]["type"] == "Linear"
    # QAT moved the kept weights: one that ended below half a step rounds to zero, and is logged
    zeros_match_masks(out / "pruned-int8.safetensors", out / "pruned.safetensors", lost)
    data = load_splits("digits", seed=0)
    model, info = load_artifact(out / "pruned-int8.safetensors")
    assert isinstance(model.stem[0], QuantizedConv2d) and info.int8["layers"]["stem.0"]["static"]
    torch.set_num_threads(1)
    again = evaluate(model.eval(), data.loader("test", 128), data.num_classes)
    assert again["accuracy"] == entry["accuracy"]


def test_without_qat_the_zeros_of_weight_q_are_exactly_the_masks(run, tmp_path):
    out, _, _ = run
    start = {**TINY, "model": {"artifact": str(out / "pruned.safetensors")}}  # the masked, pruned model
    stages = [{"type": "quantize", "calibration_batches": 2}, {"type": "export", "name": "int8"}]
    metrics, lost = run_logged({**start, "stages": stages}, tmp_path)
    assert not metrics["quantization"]["qat"] and not lost  # magnitude pruning keeps no weight that small
    zeros_match_masks(tmp_path / "int8.safetensors", out / "pruned.safetensors", lost)
    model, _ = load_artifact(tmp_path / "int8.safetensors")
    for name, mask in read_artifact(out / "pruned.safetensors")[1].masks.items():
        assert torch.equal(model.get_submodule(name).weight_q == 0, ~mask), name


def test_the_report_states_accuracy_before_and_after_int8(run):
    out, m, _ = run
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## INT8" in report
    line = next(x for x in report.splitlines() if x.startswith("- INT8 accuracy: "))
    assert f"{100 * m['pruned-int8']['accuracy']:.2f}% pruned-int8 (INT8)" in line
    assert f"{100 * m['pruned']['accuracy']:.2f}% pruned (float32)" in line
    assert "fine-tuned with fake quantization (QAT), masks kept" in report
    assert "- Left float32: `fc`" in report and "not the speed of an int8 kernel" in report


def test_a_recipe_can_start_from_an_int8_artifact_but_not_train_it(run, tmp_path):
    out, m, _ = run
    start = {**TINY, "model": {"artifact": str(out / "pruned-int8.safetensors")}}
    again = run_recipe(
        recipe.from_dict({**start, "stages": [{"type": "evaluate", "label": "int8", **FAST}]}),
        tmp_path / "again",
        progress=False,
    )
    assert again["int8"]["accuracy"] == m["pruned-int8"]["accuracy"]
    bad = {**start, "stages": [{"type": "finetune", "epochs": 1, "lr": 0.01}]}
    with pytest.raises(PrunekitError, match=r"stages\[0\]: a finetune stage cannot run on the int8 model"):
        run_recipe(recipe.from_dict(bad), tmp_path / "bad", progress=False)
