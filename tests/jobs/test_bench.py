"""prunekit bench: every variant is measured for every setting in one table, sizes are the files a user would
ship, the JSON and PNG are written, and bad input is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunekit.analysis.memory import current_rss_mb
from prunekit.artifact import load_artifact, save_artifact
from prunekit.cli.commands import app
from prunekit.errors import PrunekitError
from prunekit.jobs import bench
from prunekit.masking import get_masks
from prunekit.models import build_model
from prunekit.quant.ptq import quantize_model
from prunekit.sparsifier import Sparsifier

ARGS = {"widths": [16, 32], "blocks": 1, "in_channels": 1, "num_classes": 10}
runner = CliRunner()


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    """A recipe-like output directory: dense.safetensors and pruned.safetensors (80% sparse convs)."""
    out = tmp_path_factory.mktemp("bench-src")
    torch.manual_seed(0)
    model = build_model("resnet-digits", ARGS)
    info = {"name": "resnet-digits", "args": ARGS}
    save_artifact(out / "dense.safetensors", model, model_info=info)
    sparsifier = Sparsifier(model, 0.8, criterion="magnitude", group="layer")
    sparsifier.prepare()
    sparsifier.prune()
    assert get_masks(model)
    save_artifact(out / "pruned.safetensors", model, model_info=info, specs=sparsifier.layer_specs())
    return out


@pytest.fixture(scope="module")
def with_int8(outdir, tmp_path_factory) -> Path:
    """The same directory plus a recipe-style INT8 export (static activations, calibrated)."""
    import shutil

    out = tmp_path_factory.mktemp("bench-int8")
    for name in ("dense", "pruned"):
        shutil.copy(outdir / f"{name}.safetensors", out)
    pruned, _ = load_artifact(out / "pruned.safetensors")
    calib = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    int8 = quantize_model(pruned, activations="static", calibration=calib)
    save_artifact(out / "pruned-int8.safetensors", int8, model_info={"name": "resnet-digits", "args": ARGS})
    return out


def test_resolve_directory_and_artifact(outdir):
    src = bench.resolve_source(str(outdir), outdir)
    assert src.pruned == outdir / "pruned.safetensors" and src.dense == outdir / "dense.safetensors"
    assert src.sample_shape == (1, 8, 8)  # the built-in digits model's default input
    alone = bench.resolve_source(str(outdir / "pruned.safetensors"), outdir)
    assert alone.dense is None and alone.pruned == src.pruned
    shaped = bench.resolve_source(str(outdir / "pruned.safetensors"), outdir, (4, 1, 12, 12))
    assert shaped.sample_shape == (1, 12, 12)


def test_an_int8_export_serves_the_int8_variants(with_int8):
    src = bench.resolve_source(str(with_int8), with_int8)
    assert src.pruned == with_int8 / "pruned.safetensors"
    assert src.int8 == with_int8 / "pruned-int8.safetensors"
    int8 = bench.load_variant(src, "pruned-int8")
    recorded, _ = load_artifact(src.int8)
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(
            int8(x), recorded.eval()(x)
        )  # the recipe's calibrated model, not a re-quantization
    alone = bench.resolve_source(str(src.int8), with_int8)
    assert alone.pruned is None and alone.int8 == src.int8
    assert not alone.available("pruned") and alone.available("compiled-int8")
    sizes = bench.sizes(src)
    assert sizes["pruned-int8"] < sizes["pruned"] < sizes["dense"]


def test_bad_sources_are_clear_errors(tmp_path, outdir):
    with pytest.raises(PrunekitError, match="not a .safetensors artifact"):
        bench.resolve_source(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(PrunekitError, match="holds no pruned artifact"):
        bench.resolve_source(str(tmp_path), tmp_path)
    src = bench.resolve_source(str(outdir), outdir)
    with pytest.raises(PrunekitError, match="unknown variants"):
        bench.bench(src, variants=("dense", "fast"))
    with pytest.raises(PrunekitError, match="--batch"):
        bench.bench(src, batches=(0,), variants=("pruned",))
    with pytest.raises(PrunekitError, match="--runs"):
        bench.bench(src, runs=3, variants=("pruned",))


def test_table_covers_every_variant_and_setting(outdir):
    src = bench.resolve_source(str(outdir), outdir)
    variants = ("dense", "pruned")
    result = bench.bench(
        src, batches=(1, 3), threads=(1,), runs=20, warmup=2, variants=variants, memory=False
    )
    settings = {(r["variant"], r["threads"], r["batch"]) for r in result["rows"]}
    assert settings == {(v, 1, b) for v in variants for b in (1, 3)}
    for r in result["rows"]:
        assert r["runs"] == 20
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] / (r["mean_ms"] / 1e3))
    dense_rows = [r for r in result["rows"] if r["variant"] == "dense"]
    assert all(r["p50_vs_first"] == 1.0 for r in dense_rows)
    # sizes are the shipped files: the dense artifact as it is, the pruned model compressed
    assert result["size_bytes"]["dense"] == (outdir / "dense.safetensors").stat().st_size
    assert result["size_bytes"]["pruned"] < 0.5 * result["size_bytes"]["dense"]
    text = bench.table(result)
    assert len(text.splitlines()) == 1 + len(result["rows"]) + 1
    assert "nan" not in text  # memory=False: the peak RSS column says "-"
    assert all(line.rstrip().endswith(" -") for line in text.splitlines()[1:-1])
    png = bench.chart(result, outdir / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_variant_including_compiled(with_int8):
    src = bench.resolve_source(str(with_int8), with_int8)
    result = bench.bench(src, batches=(2,), threads=(1,), runs=10, warmup=1, memory=False)
    assert [r["variant"] for r in result["rows"]] == list(bench.VARIANTS)
    assert "as the recipe quantized it" in result["int8_from"]
    compiled = {d["variant"]: d for d in result["compile"]}
    assert set(compiled) == {"compiled", "compiled-int8"}
    for d in compiled.values():
        assert d["batch"] == 2 and d["threads"] == 1 and d["seconds"] > 0
        assert all("dense_us" in layer and layer["chosen"] for layer in d["layers"])
        assert d["max_abs_diff_vs_uncompiled"] <= 1e-4  # the same function as its uncompiled twin
    # each compiled variant was built from its own twin: the int8 one from the int8 model's layers
    kinds = {v: {layer["kind"] for layer in d["layers"]} for v, d in compiled.items()}
    assert "QuantizedConv2d" in kinds["compiled-int8"] and "QuantizedConv2d" not in kinds["compiled"]
    assert result["size_bytes"]["compiled-int8"] == result["size_bytes"]["pruned-int8"]
    # the dense engines a user would deploy instead, timed in the same run, built from the dense artifact
    assert set(result["engines"]) == set(bench.BASELINES) and not result["skipped_reasons"]
    assert result["size_bytes"]["onnxruntime-int8"] < result["size_bytes"]["onnxruntime-fp32"]
    assert "dense baselines (from the dense artifact)" in bench.table(result)


def test_variants_the_source_cannot_serve(with_int8):
    alone = bench.resolve_source(str(with_int8 / "pruned-int8.safetensors"), with_int8)
    with pytest.raises(PrunekitError, match="none of the variants asked for"):
        bench.bench(alone, variants=("dense", "pruned"), runs=10, memory=False)
    with pytest.raises(PrunekitError, match="none of the variants"):
        bench.bench(alone, variants=(), runs=10, memory=False)
    result = bench.bench(
        alone, batches=(1,), threads=(1,), runs=10, variants=("pruned", "pruned-int8"), memory=False
    )
    assert result["variants"] == ["pruned-int8"] and result["skipped"] == ["pruned"]


def test_peak_rss_probe_runs_in_a_fresh_process(outdir):
    src = bench.resolve_source(str(outdir), outdir)
    ballast = bytearray(600 * 2**20)  # this process now holds 600 MB more than the probe ever will
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    rss = bench.peak_rss(src, "pruned", batch=2, runs=3)
    assert rss["load_peak_rss_mb"] >= rss["baseline_rss_mb"] > 0 and rss["peak_rss_mb"] > 0
    # the probe's own peak, not one inherited from this (larger) parent through fork + exec
    assert rss["peak_rss_mb"] < current_rss_mb() - 300
    del ballast


def test_cli_writes_json_and_png(outdir, tmp_path):
    out = tmp_path / "b"
    args = ["bench", str(outdir), "--out", str(out), "--batch", "1", "--threads", "1", "--runs", "10"]
    result = runner.invoke(app, [*args, "--variants", "dense,pruned", "--no-memory"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert {r["variant"] for r in data["rows"]} == {"dense", "pruned"}
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "pruned" in result.output and "p99 ms" in result.output


def test_cli_rejects_bad_lists(outdir, tmp_path):
    result = runner.invoke(app, ["bench", str(outdir), "--out", str(tmp_path), "--batch", "1,x"])
    assert isinstance(result.exception, PrunekitError) and "--batch" in str(result.exception)
