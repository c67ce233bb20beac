"""Recipes that time the sparse runtime and write compressed artifacts: the compiled twin predicts what the
model predicts, every targeted layer has a decision, the compressed file decodes to the exported weights,
and the report shows the numbers from metrics.json."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from prunekit.artifact import read_artifact
from prunekit.compress import load_compressed, read_header
from prunekit.errors import PrunekitError
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe

RECIPE: dict[str, Any] = {
    "name": "tiny-runtime",
    "seed": 0,
    "model": {"builtin": "resnet-digits", "args": {"widths": [16, 32], "blocks": 1}},
    "data": {"name": "digits", "batch_size": 128},
    "stages": [
        {"type": "train", "epochs": 1, "lr": 0.05},
        {"type": "evaluate", "label": "dense", "latency_runs": 10, "latency_warmup": 1},
        {"type": "export", "name": "dense"},
        {"type": "prune", "pattern": 0.9},
        {"type": "evaluate", "label": "pruned", "latency_runs": 10, "latency_warmup": 1, "compile": True},
        {"type": "export", "name": "pruned", "compressed": True},
        {"type": "quantize", "activations": "dynamic"},
        {"type": "evaluate", "label": "int8", "latency_runs": 10, "latency_warmup": 1, "compile": True},
        {"type": "export", "name": "int8", "compressed": True},
    ],
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime-run")
    return out, run_recipe(recipe.from_dict(RECIPE), out, progress=False)


def test_compiled_twin_is_timed_and_agrees(result):
    _, m = result
    c = m["pruned"]["compiled"]
    assert c["samples"] == sum(m["pruned"]["support"])
    assert c["same_predictions"] == c["samples"]
    assert c["max_abs_diff"] <= 1e-3
    # one decision per Linear/Conv2d layer of the model (stem, 2 blocks' convs, shortcut, fc)
    names = [d["name"] for d in c["layers"]]
    assert len(names) == len(set(names)) and "fc" in names and "stem.0" in names
    assert c["sparse_layers"] == sum(d["chosen"] != "dense" for d in c["layers"])
    assert 0 < c["latency_ms"]["p50"] <= c["latency_ms"]["p99"]
    assert c["latency_runs"] == m["pruned"]["latency_runs"]
    assert "compiled" not in m["dense"]


def test_compressed_export_decodes_to_the_exported_weights(result):
    out, m = result
    path = out / "pruned.compressed.safetensors"
    assert m["pruned"]["compressed_size_bytes"] == path.stat().st_size
    assert m["pruned"]["compressed_size_bytes"] < 0.5 * m["dense"]["size_bytes"]
    tensors, info = read_artifact(out / "pruned.safetensors")
    decoded = load_compressed(path)
    assert set(decoded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(decoded[name], t), name
    header = read_header(path)
    assert header["extra"]["model"]["name"] == "resnet-digits"
    weights = [n for n, e in header["tensors"].items() if e["spec"]]
    assert weights and all(n.endswith(".weight") for n in weights)


def test_compressed_int8_export_keeps_specs_and_the_int8_plan(result):
    out, m = result
    tensors, info = read_artifact(out / "int8.safetensors")
    header = read_header(out / "int8.compressed.safetensors")
    assert header["extra"]["int8"] == info.int8 and info.int8["layers"]
    decoded = load_compressed(out / "int8.compressed.safetensors")
    for name, t in tensors.items():
        assert torch.equal(decoded[name], t), name
    # every pruned layer's spec is recorded on the tensor that holds its weight (weight_q once int8)
    for layer in info.int8["layers"]:
        if layer in info.specs:
            assert header["tensors"][f"{layer}.weight_q"]["spec"] == info.specs[layer].to_dict()
    assert m["int8"]["compiled"]["same_predictions"] == m["int8"]["compiled"]["samples"]


def test_report_shows_the_compiled_numbers(result):
    out, m = result
    report = (out / "report.md").read_text()
    c = m["pruned"]["compiled"]
    row = next(line for line in report.splitlines() if line.startswith("| pruned (compiled) |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(c["latency_ms"]["p50"], abs=5e-4)
    assert cells[4] == f"{c['sparse_layers']}/{len(c['layers'])}"
    assert cells[5].startswith(f"{c['same_predictions']}/{c['samples']}")
    assert re.search(r"Sparse runtime \(`prunekit.runtime.compile`\): p50 \d+\.\d\dx of dense", report)
    assert "Size on disk: the compressed artifact is" in report


def test_unknown_keys_on_the_new_fields_are_errors():
    bad = {**RECIPE, "stages": [*RECIPE["stages"][:4], {"type": "evaluate", "label": "x", "compiled": True}]}
    with pytest.raises(PrunekitError, match="compiled.*did you mean 'compile'"):
        recipe.from_dict(bad)
    bad["stages"][-1] = {"type": "export", "name": "x", "compress": True}
    with pytest.raises(PrunekitError, match="compress.*did you mean 'compressed'"):
        recipe.from_dict(bad)
