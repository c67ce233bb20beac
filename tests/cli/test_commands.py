"""The command line end to end: a tiny recipe run writes consistent metrics, report and artifacts; the
same seed gives the same masks; user mistakes exit 2 with one `error:` line and leave no metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fixtures.cli import assert_one_line_error, call_main, subprocess_cli
from prunekit.artifact import inspect_artifact, read_artifact
from prunekit.cli.commands import app
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe

TINY_RECIPE = """\
name: tiny
seed: {seed}
model:
  builtin: resnet-digits
  args: {{widths: [8, 16], blocks: 1}}
data: {{name: digits, batch_size: 128}}
stages:
  - {{type: train, epochs: 1, lr: 0.05}}
  - {{type: evaluate, label: dense, latency_runs: 5, latency_warmup: 1}}
  - {{type: export, name: dense}}
  - type: prune
    pattern: {sparsity}
    criterion: magnitude
    group: global
    schedule: {{type: iterative, rate: 0.5}}
    finetune: {{epochs: 1, lr: 0.01}}
  - {{type: evaluate, label: pruned, latency_runs: 5, latency_warmup: 1}}
  - {{type: export, name: pruned}}
"""
SPARSITY = 0.6
LABELS = ("dense", "pruned")
runner = CliRunner()


def write_recipe(directory: Path, seed: int = 0, name: str = "tiny.yaml", **extra) -> Path:
    data = yaml.safe_load(TINY_RECIPE.format(seed=seed, sparsity=SPARSITY))
    data.update(extra)
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real run of the tiny recipe through the CLI (in process): its output directory and result."""
    base = tmp_path_factory.mktemp("cli")
    out = base / "out"
    result = runner.invoke(app, ["run", str(write_recipe(base)), "--out", str(out), "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return out, metrics, result.output


# ------------------------------------------------------------------------------------------------ recipes


def test_recipes_list_names_the_builtin():
    result = runner.invoke(app, ["recipes", "list"])
    assert result.exit_code == 0
    names = recipe.builtin_names()
    lines = result.output.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if not line.startswith(" ")]
    assert [lines[i].split()[0] for i in starts] == list(names)  # one entry per recipe, in order
    column = {len(lines[i]) - len(lines[i][len(name) :].lstrip()) for i, name in zip(starts, names)}
    assert len(column) == 1  # the descriptions start in one column
    # the wrapped lines join to the description
    for i, name, end in zip(starts, names, [*starts[1:], len(lines)]):
        text = " ".join(line.strip() for line in lines[i:end])[len(name) :].strip()
        assert text == " ".join(recipe.load_builtin(name).description.split())


def test_recipes_show_prints_a_valid_recipe():
    result = runner.invoke(app, ["recipes", "show", "edge-digits"])
    assert result.exit_code == 0
    shown = recipe.from_dict(yaml.safe_load(result.output))
    assert shown == recipe.load_builtin("edge-digits")


def test_demo_runs_the_builtin_recipe(monkeypatch, tmp_path):
    import prunekit.cli.run as cli

    seen = {}

    def fake_run(r, out, quiet, *options, **named):  # options: --strict, --class-drop, --store, ...
        seen.update(recipe=r, out=out, quiet=quiet)

    monkeypatch.setattr(cli, "_run", fake_run)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "-q"])
    assert result.exit_code == 0, result.output
    assert seen == {"recipe": recipe.load_builtin("edge-digits"), "out": tmp_path / "d", "quiet": True}


def test_version():
    from prunekit import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"prunekit {__version__}"


def test_real_process_exit_codes(tmp_path):
    listed = subprocess_cli("recipes", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "edge-digits" in listed.stdout, listed.stderr

    bad = write_recipe(tmp_path, criterian="magnitude")  # a top-level typo, rejected before any work
    failed = subprocess_cli("run", str(bad), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert failed.returncode == 2
    assert_one_line_error(failed.stderr, "unknown key 'criterian'")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- run


def test_run_writes_every_output(run):
    out, metrics, stdout = run
    names = {p.name for p in out.iterdir()}
    reports = {n for n in names if n.startswith("report")}  # report.md, report.html and its charts
    assert {"report.md", "report.html"} <= reports
    # no temp files; log.jsonl, checkpoint/ and run.json from prunekit.jobs.runlog, .checkpoint and .rundir
    assert names - reports == {
        "metrics.json",
        "run.json",
        "log.jsonl",
        "checkpoint",
        "dense.safetensors",
        "pruned.safetensors",
    }
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"last.safetensors", "previous.safetensors"}
    for label in LABELS:
        assert re.search(rf"^{label}\s+\d\.\d{{4}}", stdout, re.MULTILINE), stdout
    assert "metrics.json" in stdout


@pytest.mark.parametrize("label", LABELS)
def test_metrics_entries_are_consistent(run, label):
    out, metrics, _ = run
    e = metrics[label]
    assert 0.0 <= e["accuracy"] <= 1.0
    recall, support = e["per_class_recall"], e["support"]
    assert len(recall) == len(support) == 10
    assert all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in recall)
    assert sum(support) == 360  # the 20% stratified test split of 1,797
    assert e["accuracy"] == pytest.approx(sum(r * s for r, s in zip(recall, support)) / sum(support))
    assert 0 < e["nonzero_params"] <= e["params"]
    assert e["sparsity"] == pytest.approx(1 - e["nonzero_params"] / e["params"])
    assert e["size_bytes"] == (out / f"{label}.safetensors").stat().st_size
    assert 0 < e["latency_ms"]["p50"] <= e["latency_ms"]["p99"]
    assert e["latency_runs"] >= 5
    assert e["recipe"]["seed"] == 0 and e["recipe"]["model"]["builtin"] == "resnet-digits"
    rows, totals = inspect_artifact(out / f"{label}.safetensors")
    assert (totals["params"], totals["nonzero"]) == (e["params"], e["nonzero_params"])


def test_metrics_tell_the_pruning_story(run):
    _, metrics, _ = run
    dense, pruned = metrics["dense"], metrics["pruned"]
    assert dense["params"] == pruned["params"]
    assert dense["sparsity"] < 0.01 < pruned["sparsity"]
    assert [s["type"] for s in dense["recipe"]["stages"]] == ["train"]
    assert [s["type"] for s in pruned["recipe"]["stages"]] == ["train", "prune"]
    rounds = metrics["rounds"]
    # round 0 is the unpruned start; then 50% of the rest per round: 0.5, then 0.6
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["targeted_sparsity"] == 0.0
    targeted = [r["targeted_sparsity"] for r in rounds]
    assert targeted == sorted(targeted) and targeted[-1] == pytest.approx(SPARSITY, abs=1e-3)
    assert rounds[-1]["model_sparsity"] == pytest.approx(pruned["sparsity"])
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in rounds)
    assert metrics["recipe"] == recipe.to_dict(recipe.from_dict(metrics["recipe"]))
    assert re.fullmatch(r"[0-9a-f]{64}", metrics["masks_sha256"])
    assert "fc" in metrics["left_dense"]


def test_targeted_sparsity_is_exact_and_the_classifier_stays_dense(run):
    out, metrics, _ = run
    tensors, info = read_artifact(out / "pruned.safetensors")
    assert "fc" not in info.masks and "fc" not in info.specs
    assert int((tensors["fc.weight"] != 0).sum()) == tensors["fc.weight"].numel()
    assert set(info.masks) == set(info.specs)
    total = sum(m.numel() for m in info.masks.values())
    removed = sum(int((~m).sum()) for m in info.masks.values())
    assert removed == round(SPARSITY * total)  # global selection removes exactly this many
    zeros = sum(int((tensors[f"{n}.weight"] == 0).sum()) for n in info.masks)
    assert removed <= zeros <= removed + 3  # a kept weight may be exactly zero, rarely
    for name, mask in info.masks.items():
        assert bool((tensors[f"{name}.weight"][~mask] == 0).all()), name
    layer_rows = {r["layer"]: r for r in metrics["pruned"]["layers"]}
    assert layer_rows["fc"]["nonzero"] == layer_rows["fc"]["params"]
    assert layer_rows["fc"]["pattern"] == "dense"
    for name in info.masks:
        assert layer_rows[name]["pattern"].startswith("unstructured 60%")
    dense_tensors, dense_info = read_artifact(out / "dense.safetensors")
    assert dense_info.masks == {} and all(
        int((t == 0).sum()) == 0 for k, t in dense_tensors.items() if k.endswith("conv1.weight")
    )


def test_report_has_the_tables_and_a_latency_verdict(run):
    out, metrics, _ = run
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# prunekit report: tiny")
    assert "## Per-layer sparsity" in report
    assert "| layer | type | shape | params | non-zero | sparsity | pattern |" in report
    for row in metrics["pruned"]["layers"]:
        assert re.search(rf"^\| {re.escape(row['layer'])} \| {row['type']} \|", report, re.MULTILINE)
    verdicts = [line for line in report.splitlines() if line.startswith("- Latency: ")]
    assert len(verdicts) == 1
    assert re.search(r"faster|slower|did not make inference faster", verdicts[0])
    assert "## Per-class recall" in report and "## Pruning rounds" in report


def test_same_seed_same_result_other_seed_other_masks(run, tmp_path):
    _, first, _ = run
    again = run_recipe(recipe.load(write_recipe(tmp_path, seed=0)), tmp_path / "again", progress=False)
    assert again["masks_sha256"] == first["masks_sha256"]
    for label in LABELS:
        assert again[label]["accuracy"] == first[label]["accuracy"]
        assert again[label]["per_class_recall"] == first[label]["per_class_recall"]
        assert again[label]["nonzero_params"] == first[label]["nonzero_params"]
    assert [r["val_accuracy"] for r in again["rounds"]] == [r["val_accuracy"] for r in first["rounds"]]
    other = run_recipe(recipe.load(write_recipe(tmp_path, seed=1)), tmp_path / "other", progress=False)
    assert other["masks_sha256"] != first["masks_sha256"]


def test_a_run_from_an_artifact_keeps_its_masks_and_specs(run, tmp_path):
    out, first, _ = run
    source = out / "pruned.safetensors"
    data = {
        "name": "again",
        "model": {"artifact": str(source)},
        "data": {"name": "digits", "batch_size": 128},
        "stages": [
            {"type": "finetune", "epochs": 1, "lr": 0.001},
            {"type": "evaluate", "label": "pruned", "latency_runs": 2, "latency_warmup": 0},
            {"type": "export", "name": "pruned"},
        ],
    }
    metrics = run_recipe(recipe.from_dict(data), tmp_path / "again", progress=False)
    _, before = read_artifact(source)
    _, after = read_artifact(tmp_path / "again" / "pruned.safetensors")
    assert after.specs == before.specs and set(after.specs) == set(before.masks)
    assert all(torch.equal(after.masks[n], before.masks[n]) for n in before.masks)  # fine-tuning kept them
    assert metrics["masks_sha256"] == first["masks_sha256"]
    patterns = {r["layer"]: r["pattern"] for r in metrics["pruned"]["layers"]}
    assert all(patterns[n] == str(before.specs[n]) for n in before.specs)


# ------------------------------------------------------------------------------------------------- inspect


def test_inspect_prints_the_table(run):
    out, _, _ = run
    path = out / "pruned.safetensors"
    rows, totals = inspect_artifact(path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:2] == ["tensor", "shape"]
    assert len(lines) == len(rows) + 3
    for line, row in zip(lines[1:], rows):
        assert line.split()[0] == row["tensor"]
        assert line.split()[-1] == "dense" or "unstructured" in line
    assert lines[-2].startswith("total") and f"file {totals['size_bytes']:,} bytes" in lines[-2]
    assert lines[-1] == "SHA-256 verified" and totals["verified"]


def test_inspect_json_parses(run):
    out, metrics, _ = run
    path = out / "pruned.safetensors"
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    rows, totals = inspect_artifact(path)
    assert data == {"layers": rows, "total": totals}
    assert data["total"]["size_bytes"] == path.stat().st_size == metrics["pruned"]["size_bytes"]


# ---------------------------------------------------------------------------------------------- bad input


def corrupted_copy(run, tmp_path: Path) -> Path:
    out, _, _ = run
    raw = bytearray((out / "pruned.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    return bad


def test_bad_recipe_key_exits_2(monkeypatch, capsys, tmp_path):
    bad = write_recipe(tmp_path, modle={})
    code, _, err = call_main(monkeypatch, capsys, "run", str(bad), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, "did you mean 'model'")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_stage_key_exits_2(monkeypatch, capsys, tmp_path):
    data = yaml.safe_load(TINY_RECIPE.format(seed=0, sparsity=SPARSITY))
    data["stages"][3]["criterian"] = "magnitude"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    code, _, err = call_main(monkeypatch, capsys, "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, "stages[3]: unknown key 'criterian' (did you mean 'criterion'?)")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_recipe_file_exits_2(monkeypatch, capsys, tmp_path):
    code, _, err = call_main(
        monkeypatch, capsys, "run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")
    )
    assert code == 2
    assert_one_line_error(err, "recipe file not found")
    assert not (tmp_path / "o").exists()


def test_missing_artifact_exits_2(monkeypatch, capsys, tmp_path):
    code, _, err = call_main(monkeypatch, capsys, "inspect", str(tmp_path / "nope.safetensors"))
    assert code == 2
    assert_one_line_error(err, "artifact not found")

    path = write_recipe(tmp_path, model={"artifact": str(tmp_path / "nope.safetensors")})
    code, _, err = call_main(monkeypatch, capsys, "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, "artifact file not found")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_corrupted_artifact_exits_2(run, monkeypatch, capsys, tmp_path):
    bad = corrupted_copy(run, tmp_path)
    code, out, err = call_main(monkeypatch, capsys, "inspect", str(bad))
    assert code == 2 and out == ""
    assert_one_line_error(err, "SHA-256")

    path = write_recipe(tmp_path, model={"artifact": str(bad)})
    code, _, err = call_main(monkeypatch, capsys, "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, "SHA-256")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("where", ["file", "file/sub", "file/sub/deeper"])
def test_out_that_cannot_be_a_directory_exits_2(monkeypatch, capsys, tmp_path, where):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / where
    code, _, err = call_main(monkeypatch, capsys, "run", str(write_recipe(tmp_path)), "--out", str(out))
    assert code == 2
    assert_one_line_error(err, "not a directory")
    assert (tmp_path / "file").read_text() == "not a directory"


def test_unknown_builtin_recipe_exits_2(monkeypatch, capsys):
    code, _, err = call_main(monkeypatch, capsys, "recipes", "show", "edge-digit")
    assert code == 2
    assert_one_line_error(err, "did you mean 'edge-digits'")


def test_usage_errors_exit_2(monkeypatch, capsys, tmp_path):
    code, _, _ = call_main(monkeypatch, capsys, "run", str(write_recipe(tmp_path)))  # no --out
    assert code == 2
    code, _, _ = call_main(monkeypatch, capsys, "no-such-command")
    assert code == 2


def test_success_exits_0_through_main(run, monkeypatch, capsys):
    out, _, _ = run
    code, stdout, err = call_main(monkeypatch, capsys, "inspect", str(out / "dense.safetensors"), "--json")
    assert code == 0 and err == ""
    assert json.loads(stdout)["total"]["sparsity"] < 0.01
