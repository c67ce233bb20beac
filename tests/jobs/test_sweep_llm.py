"""Language-model sparsity sweeps on a tiny random Llama: exact sparsity of every pruned linear, valid N:M
groups, the Pareto front with lower-is-better perplexity against its definition, files that parse back to
the returned rows, and one-line errors. No timing assertions (shared machine)."""

import csv
import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fixtures.cli import assert_one_line_error, call_main  # noqa: E402
from fixtures.hf import llama  # noqa: E402
from prunekit.calib.blocks import find_blocks, linear_layers  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.jobs.sweep import pareto_front, write_sweep  # noqa: E402
from prunekit.jobs.sweep_llm import COLUMNS, SweepPoint, parse_llm_methods, run_llm_sweep  # noqa: E402
from prunekit.llm.text import pydoc_topics_split  # noqa: E402


def test_parse_llm_methods():
    got = parse_llm_methods("magnitude, wanda,sparsegpt:2:4,2:4")
    assert got == [
        SweepPoint("magnitude", "magnitude"),
        SweepPoint("wanda", "wanda"),
        SweepPoint("sparsegpt:2:4", "sparsegpt", "2:4"),
        SweepPoint("2:4", "magnitude", "2:4"),
    ]
    assert got[3].sparsities([0.3, 0.7]) == [0.5] and got[0].sparsities([0.3, 0.7]) == [0.3, 0.7]
    for bad, needle in [
        ("random", "unknown"),
        ("", "at least one"),
        ("wanda:0.5", "N:M"),
        ("obd:2:4", "unknown"),
        ("wanda+dsnt", "unknown"),
        ("wanda+dsnot+dsnot", "unknown"),
        ("wanda+block+sublayer", "choose one reconstruction"),
        ("wanda+owl:2:4", "OWL allocates unstructured"),
    ]:
        with pytest.raises(PrunekitError, match=needle) as info:
            parse_llm_methods(bad)
        assert "\n" not in str(info.value)


def test_parse_llm_methods_with_alps_and_modifiers():
    got = parse_llm_methods("alps, sparsegpt+owl+dsnot, alps+block:2:4, wanda+layer, magnitude+sublayer")
    assert got == [
        SweepPoint("alps", "alps"),
        SweepPoint("sparsegpt+owl+dsnot", "sparsegpt", owl=True, refine="dsnot"),
        SweepPoint("alps+block:2:4", "alps", "2:4", reconstruct="block"),
        SweepPoint("wanda+layer", "wanda", reconstruct="layer"),
        SweepPoint("magnitude+sublayer", "magnitude", reconstruct="sublayer"),
    ]
    config = got[1].config(0.7)
    assert (config.owl, config.refine, config.spec.sparsity) == (True, "dsnot", 0.7)
    assert got[4].needs_data and not SweepPoint("2:4", "magnitude", "2:4").needs_data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=12))
def test_pareto_front_lower_is_better_matches_definition(points):
    def dominated(i):
        ci, vi = points[i]
        return any(c <= ci and v <= vi and (c < ci or v < vi) for j, (c, v) in enumerate(points) if j != i)

    front = pareto_front(points, higher_is_better=False)
    undominated = {i for i in range(len(points)) if not dominated(i)}
    # every undominated point is on the front once (of exact duplicates the first); none dominated is
    assert set(front) <= undominated
    assert {points[i] for i in front} == {points[i] for i in undominated}
    assert len(front) == len({points[i] for i in front})
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def _check_pareto(rows, front_labels, cost):
    """A row is on the front exactly when no row has cost <= and perplexity <=, one strictly (lower is
    better for both); of exact duplicates only the first is listed."""
    labels = [f"{r['method']}@{r['sparsity']:g}" for r in rows]
    on = {labels.index(label) for label in front_labels}
    for i, r in enumerate(rows):
        key = (r[cost], r["perplexity"])
        beaten = any(
            o[cost] <= key[0] and o["perplexity"] <= key[1] and (o[cost], o["perplexity"]) != key
            for o in rows
        )
        duplicate = any((o[cost], o["perplexity"]) == key for o in rows[:i])
        assert (i in on) == (not beaten and not duplicate), (labels[i], cost)


def test_llm_sweep_exact_sparsity_nm_groups_and_files(tmp_path):
    torch.manual_seed(0)
    model = llama(layers=2).eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (4, 16), generator=generator)
    windows = torch.randint(0, 128, (2, 16), generator=generator)
    seen = []

    def inspect(row, pruned):
        path, blocks = find_blocks(pruned)
        layers = {
            f"{path}.{i}.{n}": m.weight.detach()
            for i, b in enumerate(blocks)
            for n, m in linear_layers(b).items()
        }
        assert len(layers) == 2 * 7
        total = 0
        for name, w in layers.items():
            zeros = int((w == 0).sum())
            total += zeros
            if row["method"] == "dense":
                assert zeros == 0, name
            elif row["method"] == "magnitude":  # compared within the layer
                assert zeros == round(row["sparsity"] * w.numel()), name
            elif row["method"] == "wanda":  # within each output row
                assert ((w == 0).sum(1) == round(row["sparsity"] * w.shape[1])).all(), name
            else:  # 2:4: exactly 2 zeros in every group of 4 inputs
                assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert row["pruned_layer_sparsity"] == total / sum(w.numel() for w in layers.values())
        # embeddings, norms and the LM head stay as they were
        state = pruned.state_dict()
        for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(state[key], dense_state[key])
        seen.append((row["method"], row["sparsity"]))

    result = run_llm_sweep(
        model, calib, windows, parse_llm_methods("magnitude,wanda,2:4"), [0.5, 0.25], latency_runs=2,
        on_point=inspect,
    )  # fmt: skip
    assert seen == [("dense", 0.0), ("magnitude", 0.25), ("magnitude", 0.5), ("wanda", 0.25), ("wanda", 0.5),
                    ("2:4", 0.5)]  # fmt: skip
    for key, value in model.state_dict().items():  # the dense model is left unchanged
        assert torch.equal(value, dense_state[key]), key
    rows = result["points"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.25, 0.5, 0.25, 0.5, 0.5]
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["pruned_layer_sparsity"] == r["sparsity"]  # every targeted count is an integer here
        assert r["params"] == rows[0]["params"] and r["dense_size_bytes"] == rows[0]["dense_size_bytes"]
        assert r["latency_p50_ms"] > 0 and r["latency_ratio"] > 0
    # pruning removes the same count from the compressed file whatever the method at one sparsity
    assert rows[0]["nonzero"] - rows[2]["nonzero"] == rows[0]["nonzero"] - rows[4]["nonzero"] > 0
    assert rows[2]["size_bytes"] < rows[0]["size_bytes"]
    _check_pareto(rows, result["pareto"]["latency"], "latency_ratio")
    _check_pareto(rows, result["pareto"]["size"], "size_bytes")

    paths = write_sweep(result, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["points"] == rows
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows)
    for t, r in zip(table, rows):
        assert t["method"] == r["method"]
        for key in COLUMNS[1:]:
            assert float(t[key]) == r[key], key  # repr round-trips floats exactly
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_llm_sweep_cli(model_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    held = tmp_path / "eval.txt"  # a short evaluation text keeps the test fast
    held.write_text(pydoc_topics_split()[1][:3000], encoding="utf-8")
    code, stdout, stderr = call_main(
        monkeypatch, capsys, "analyze", "sweep", str(model_dir), "--llm", "--methods", "magnitude,sparsegpt",
        "--grid", "0.5,0.25", "--seqlen", "16", "--calib-samples", "2", "--latency-runs", "2",
        "--eval-file", str(held), "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert "Pareto front (perplexity vs latency)" in stdout
    data = json.loads((out / "sweep.json").read_text())
    assert data["metric"] == "perplexity" and data["higher_is_better"] is False
    assert [(r["method"], r["sparsity"]) for r in data["points"]] == [
        ("dense", 0.0), ("magnitude", 0.25), ("magnitude", 0.5), ("sparsegpt", 0.25), ("sparsegpt", 0.5)
    ]  # fmt: skip
    assert data["calibration"] == {"samples": 2, "seqlen": 16, "seed": 0}
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "digits"], "--data"),
        (["--methods", "random"], "unknown language-model method"),
        (["--grid", "0.5,1.5"], "--grid"),
        (["--finetune-epochs", "1"], "one-shot"),
        (["--seqlen", "1"], "--seqlen"),
    ],
)
def test_llm_sweep_errors_are_one_line(model_dir, tmp_path, monkeypatch, capsys, args, needle):  # noqa: F811
    out = tmp_path / "o"
    code, _, stderr = call_main(
        monkeypatch, capsys, "analyze", "sweep", str(model_dir), "--llm", *args, "--out", str(out)
    )
    assert code != 0
    assert_one_line_error(stderr, needle)
    assert not out.exists()


def test_eval_file_without_llm_is_an_error(tmp_path, monkeypatch, capsys):
    code, _, stderr = call_main(
        monkeypatch,
        capsys,
        "analyze",
        "sweep",
        "a.safetensors",
        "--eval-file",
        "x.txt",
        "--out",
        str(tmp_path),
    )
    assert code != 0
    assert_one_line_error(stderr, "--llm")
