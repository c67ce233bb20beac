"""The shipped demo, end to end, checked against its acceptance criteria (slow: about a minute).

Run with ``python -m pytest -m slow``.
"""

import json
import subprocess
import sys

import pytest

from prunekit.artifact import load_artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "prunekit", "demo", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "metrics.json").read_text())


def test_demo_meets_its_targets(demo):
    out, m = demo
    dense, pruned = m["dense"], m["pruned"]
    assert dense["accuracy"] >= 0.95
    assert dense["accuracy"] - pruned["accuracy"] <= 0.015
    prunable = [r for r in pruned["layers"] if r["pattern"] != "dense"]
    targeted = sum(r["params"] for r in prunable)
    removed = sum(r["params"] - r["nonzero"] for r in prunable)
    assert removed == round(0.9 * targeted)
    assert [r for r in pruned["layers"] if r["layer"] == "fc"][0]["sparsity"] == 0.0
    assert m["wall_time_s"] < 300
    int8 = m["pruned-int8"]
    assert pruned["accuracy"] - int8["accuracy"] <= 0.005  # INT8 costs at most half a point
    assert m["quantization"]["before"] == "pruned" and m["quantization"]["after"] == "pruned-int8"
    assert int8["size_bytes"] < 0.3 * pruned["size_bytes"]
    for label, entry in (("dense", dense), ("pruned", pruned), ("pruned-int8", int8)):
        assert len(entry["per_class_recall"]) == 10
        assert all(0.0 <= r <= 1.0 for r in entry["per_class_recall"])
        assert entry["size_bytes"] == (out / f"{label}.safetensors").stat().st_size
        assert entry["latency_runs"] >= 200
        assert 0 < entry["latency_ms"]["p50"] <= entry["latency_ms"]["p99"]


def test_demo_artifacts_reload_to_the_same_accuracy(demo):
    out, m = demo
    import torch

    from prunekit.analysis import evaluate
    from prunekit.data import load_splits

    data = load_splits("digits", seed=m["recipe"]["seed"])
    torch.set_num_threads(1)
    for label in ("dense", "pruned", "pruned-int8"):
        model, _ = load_artifact(out / f"{label}.safetensors")
        result = evaluate(model.eval(), data.loader("test", 64), data.num_classes)
        assert result["accuracy"] == pytest.approx(m[label]["accuracy"], abs=1e-9)


def test_report_says_what_did_not_improve(demo):
    out, m = demo
    report = (out / "report.md").read_text()
    assert "## Per-layer sparsity" in report and "Layers left dense" in report
    ratio = m["pruned"]["latency_ms"]["p50"] / m["dense"]["latency_ms"]["p50"]
    if ratio >= 0.9:
        assert "did not make inference faster" in report or "slower" in report
    # the fine-tuning artifact stores zeros densely plus the mask; the compressed one is what shrinks
    packed = m["pruned"]["compressed_size_bytes"] / m["dense"]["size_bytes"]
    kept = m["pruned"]["size_bytes"] / m["dense"]["size_bytes"]
    assert kept > 1.0 > 0.5 > packed
    assert f"the compressed artifact is {packed:.3f}x of dense" in report and f"is {kept:.3f}x." in report
    # the sparse runtime's twins were timed and agree with their models on every test image
    for label in ("pruned", "pruned-int8"):
        c = m[label]["compiled"]
        assert c["same_predictions"] == c["samples"] == 360
        assert f"| {label} (compiled) | {c['latency_ms']['p50']:.3f} |" in report
    assert "- INT8 accuracy: " in report and "not the speed of an int8 kernel" in report


def test_demo_runs_its_c_export_bit_exact_on_the_host(demo):
    """The C itself, compiled with gcc and run on the whole test set (skipped, saying why, without gcc)."""
    _, m = demo
    host = m["pruned-int8"]["c_export"]["host_check"]
    if "skipped" in host:
        pytest.skip(f"the demo did not run its C export: {host['skipped']}")
    assert host["returncode"] == 0 and host["bitexact"] == host["samples"] == 360
    assert host["accuracy_torch"] == round(m["pruned-int8"]["accuracy"], 4)
    assert host["agreement"] == 1.0  # one INT8 arithmetic: the C model is the PyTorch int8 model


def test_demo_exports_c_that_agrees_with_pytorch(demo):
    out, m = demo
    e = m["pruned-int8"]["c_export"]
    assert (out / "pruned-int8-c" / "model.c").is_file() and (out / "pruned-int8-c" / "Makefile").is_file()
    assert e["reference"]["agreement"] >= 0.995
    assert e["reference"]["torch_identical"] == 360  # every output identical to PyTorch's, not only argmax
    # the 90%-pruned model stored sparse takes far less flash than the dense INT8 model; RAM does not shrink
    assert e["flash"]["weights"] < 0.35 * e["dense"]["flash"]["weights"]
    assert e["ram"]["total"] <= e["dense"]["ram"]["total"]
    report = (out / "report.md").read_text()
    assert "## Microcontroller (C export)" in report and "| dense-int8 |" in report


def test_demo_report_html_is_self_contained_and_the_class_check_is_recorded(demo):
    import re

    from prunekit.analysis.perclass import check_metrics

    out, m = demo
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page) and page.count('src="data:image/png;base64,') == 4
    assert m["per_class_check"] == check_metrics(m)  # the warning the CLI prints comes from it
    for label in ("pruned", "pruned-int8"):
        agreement = m[label]["agreement"]
        assert agreement["reference"] == "dense" and agreement["clean"]["samples"] == 360
        assert len(agreement["perturbed"]) == 7


def test_demo_times_the_engines_a_user_would_deploy_instead(demo):
    out, m = demo
    found = m["dense"]["baselines"]
    assert set(found) == {"torch-x86-int8", "onnxruntime-fp32", "onnxruntime-int8"}
    for b in found.values():  # timed in the same run, or skipped with the reason
        assert (b.get("latency_ms") and b["latency_ms"]["p50"] > 0) or b["skipped"]
    report = (out / "report.md").read_text()
    assert "## Against the engines a user would deploy instead" in report and "p50 vs fastest dense" in report
