"""Sparsity sweeps: the Pareto front against its definition, method parsing, and a fast end-to-end sweep
through the CLI (tiny model, two sparsities, a few latency runs; no timing assertions)."""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from prunekit.errors import PrunekitError
from prunekit.jobs.sweep import COLUMNS, pareto_front, parse_methods


def _dominated(p, q) -> bool:
    """q dominates p: no worse in both, better in one (cost lower is better, value higher is better)."""
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=12))
def test_pareto_front_is_exactly_the_undominated_points(points):
    front = pareto_front(points)
    undominated = [i for i, p in enumerate(points) if not any(_dominated(p, q) for q in points)]
    # every undominated point is on the front once (exact duplicates: only the first), nothing else is
    firsts = [i for i in undominated if points.index(points[i]) == i]
    assert sorted(front) == firsts
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def test_pareto_front_hand_case():
    pts = [(1.0, 0.90), (2.0, 0.95), (2.0, 0.93), (3.0, 0.94), (0.5, 0.10)]
    assert pareto_front(pts) == [4, 0, 1]
    assert pareto_front([]) == []


def test_methods_are_parsed_and_bad_ones_named():
    kinds = [(m.name, m.kind) for m in parse_methods("magnitude, random,wanda,2:4,channels")]
    assert kinds == [
        ("magnitude", "unstructured"),
        ("random", "unstructured"),
        ("wanda", "unstructured"),
        ("2:4", "nm"),
        ("channels", "nm" if False else "channels"),
    ]
    assert parse_methods("2:4")[0].sparsities([0.3, 0.9]) == [0.5]
    for bad, message in (("magnitud", "unknown method 'magnitud'"), ("movement", "train"), ("", "at least")):
        with pytest.raises(PrunekitError, match=message):
            parse_methods(bad)
    with pytest.raises(PrunekitError, match="--methods 5:4"):
        parse_methods("5:4")


def test_sweep_cli_writes_png_csv_json(tmp_path):
    import torch

    from prunekit.artifact import save_artifact
    from prunekit.cli.commands import app
    from prunekit.models import build_model

    torch.manual_seed(0)
    args = {"widths": [8], "blocks": 1}
    model = build_model("resnet-digits", args)
    artifact = tmp_path / "dense.safetensors"
    save_artifact(artifact, model, model_info={"name": "resnet-digits", "args": args})
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        app,
        [
            "analyze", "sweep", str(artifact), "--out", str(out), "--methods", "magnitude,2:4,channels",
            "--grid", "0.5,0.75", "--latency-runs", "3", "--round-to", "2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    rows = data["points"]
    # dense first, two points each for magnitude and channels, one for 2:4 (its sparsity is fixed)
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0),
        ("magnitude", 0.5),
        ("magnitude", 0.75),
        ("2:4", 0.5),
        ("channels", 0.5),
        ("channels", 0.75),
    ]
    dense = rows[0]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["size_bytes"] > 0 and r["latency_p50_ms"] > 0
    mag = [r for r in rows if r["method"] == "magnitude"]
    # unstructured: the same parameters, fewer non-zeros, a smaller compressed file as sparsity grows
    assert all(r["params"] == dense["params"] for r in mag)
    assert dense["nonzero"] > mag[0]["nonzero"] > mag[1]["nonzero"]
    assert dense["size_bytes"] > mag[0]["size_bytes"] > mag[1]["size_bytes"]
    chan = [r for r in rows if r["method"] == "channels"]
    assert dense["params"] > chan[0]["params"] > chan[1]["params"]
    # the CSV holds the same table, the JSON's Pareto fronts are points of the table
    table = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows)
    assert [float(t["accuracy"]) for t in table] == [r["accuracy"] for r in rows]
    labels = {f"{r['method']}@{r['sparsity']:g}" for r in rows}
    assert set(data["pareto"]["latency"]) <= labels and set(data["pareto"]["size"]) <= labels
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name not in ("sweep.json", "sweep.csv", "sweep.png")]


def test_sweep_cli_errors_are_one_line(tmp_path):
    from prunekit.cli.commands import app

    # prunekit.cli.commands.main prints a PrunekitError as one line; here the exception itself is checked
    cases = [
        ([str(tmp_path / "none.safetensors")], "no such file"),
        (["a.safetensors", "--grid", "0.5,1.2"], "--grid"),
        (["a.safetensors", "--methods", "magnitud"], "unknown method"),
        (["a.safetensors", "--data", "mnist"], "--data"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["analyze", "sweep", *args, "--out", str(tmp_path / "o")])
        assert isinstance(result.exception, PrunekitError), result.output
        assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "o").exists()
