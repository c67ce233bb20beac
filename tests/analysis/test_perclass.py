"""The per-class check: a class that loses more than the threshold is named even when overall accuracy
holds; `prunekit analyze classes` and `prunekit run/demo --strict` exit 3 on it, and 0 without --strict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.cli import assert_one_line_error, call_main
from prunekit.analysis.perclass import STRICT_EXIT_CODE, check_metrics, class_drops, warning_lines
from prunekit.errors import PrunekitError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "demo_metrics.json"


def held_accuracy_metrics() -> dict:
    """Four classes of 100 test inputs: overall accuracy 90% dense and pruned, but class 0 drops 5 points
    (90% -> 85%) while the others gain."""
    support = [100] * 4
    dense = {"accuracy": 0.90, "per_class_recall": [0.90, 0.90, 0.90, 0.90], "support": support}
    pruned = {"accuracy": 0.90, "per_class_recall": [0.85, 0.92, 0.92, 0.91], "support": support}
    return {"recipe_name": "constructed", "dense": dense, "pruned": pruned, "rounds": []}


def test_a_class_that_drops_five_points_is_named_although_accuracy_holds():
    m = held_accuracy_metrics()
    assert m["dense"]["accuracy"] == m["pruned"]["accuracy"]
    check = check_metrics(m)
    assert check["reference"] == "dense" and check["threshold_points"] == 2.0 and check["failed"]
    (drop,) = check["labels"]["pruned"]
    assert drop["class"] == 0 and drop["points_lost"] == pytest.approx(5.0, abs=1e-9)
    assert drop["reference"] == 0.90 and drop["candidate"] == 0.85 and drop["support"] == 100
    (line,) = warning_lines(check)
    assert "pruned" in line and "class 0 -5.00" in line and "2 points" in line
    assert not check_metrics(m, threshold_points=5.0)["failed"]  # more than the threshold, not equal


def test_the_threshold_is_strict_and_exact_at_two_points():
    assert class_drops([0.90], [0.88]) == []  # exactly 2 points (2.0000000000000018 in floats)
    assert [d["class"] for d in class_drops([0.90, 0.90], [0.879, 0.95])] == [0]
    assert class_drops([0.5, None, 0.7], [0.0, 0.0, None]) == [
        {"class": 0, "reference": 0.5, "candidate": 0.0, "points_lost": 50.0}
    ]  # classes without test inputs are skipped
    drops = class_drops([0.9, 0.9, 0.9], [0.8, 0.6, 0.9], threshold_points=0)
    assert [d["class"] for d in drops] == [1, 0]  # worst first


def test_check_errors_name_what_is_wrong():
    with pytest.raises(PrunekitError, match="differ in length"):
        class_drops([0.9], [0.9, 0.8])
    with pytest.raises(PrunekitError, match=">= 0 points"):
        class_drops([0.9], [0.9], threshold_points=-1)
    with pytest.raises(PrunekitError, match="no evaluated model"):
        check_metrics({"recipe_name": "x"})
    only_dense = {"dense": held_accuracy_metrics()["dense"]}
    with pytest.raises(PrunekitError, match=">= 0 points"):  # also with nothing to compare
        check_metrics(only_dense, threshold_points=-1)
    with pytest.raises(PrunekitError, match="reference 'nope' is not an evaluated label"):
        check_metrics(held_accuracy_metrics(), reference="nope")


def test_the_real_demo_metrics_flag_class_six():
    m = json.loads(FIXTURE.read_text())
    check = check_metrics(m)
    assert check == m["per_class_check"]  # what the pipeline recorded is what the function computes
    lost = {d["class"]: d["points_lost"] for d in check["labels"]["pruned"]}
    dense, pruned = m["dense"]["per_class_recall"], m["pruned"]["per_class_recall"]
    expected = {
        c: round(100 * (d - p), 9) for c, (d, p) in enumerate(zip(dense, pruned)) if 100 * (d - p) > 2
    }
    assert lost == expected and expected


def test_analyze_classes_warns_and_exits_3_only_with_strict(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(held_accuracy_metrics()))
    code, out, err = call_main(monkeypatch, capsys, "analyze", "classes", str(path))
    assert code == 0 and "class 0 -5.00" in err and err.startswith("warning:")
    assert "85.00%!" in out  # the table flags the offending cell
    code, out, err = call_main(monkeypatch, capsys, "analyze", "classes", str(path), "--strict")
    assert code == STRICT_EXIT_CODE == 3 and "class 0 -5.00" in err
    code, out, err = call_main(
        monkeypatch, capsys, "analyze", "classes", str(tmp_path), "--strict", "--threshold", "6"
    )
    assert code == 0 and err == "" and "ok: no class lost more than 6 points" in out
    code, out, err = call_main(monkeypatch, capsys, "analyze", "classes", str(path), "--json")
    assert code == 0 and json.loads(out) == check_metrics(held_accuracy_metrics())


def test_analyze_classes_with_one_evaluated_model_says_nothing_was_checked(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"dense": held_accuracy_metrics()["dense"]}))
    code, out, err = call_main(monkeypatch, capsys, "analyze", "classes", str(path), "--strict")
    assert code == 0 and err == "" and "ok:" not in out
    assert "nothing to check: dense is the only evaluated model" in out


def test_analyze_classes_rejects_what_is_not_a_run_metrics_file(tmp_path, monkeypatch, capsys):
    code, _, err = call_main(monkeypatch, capsys, "analyze", "classes", str(tmp_path / "missing.json"))
    assert code == 2
    assert_one_line_error(err, "no such file")
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = call_main(monkeypatch, capsys, "analyze", "classes", str(tmp_path / "bad.json"))
    assert code == 2
    assert_one_line_error(err, "not a readable JSON file")
    (tmp_path / "llm.json").write_text(json.dumps({"ppl_dense": 10.0}))
    code, _, err = call_main(monkeypatch, capsys, "analyze", "classes", str(tmp_path / "llm.json"))
    assert code == 2
    assert_one_line_error(err, "no evaluated model in it")


@pytest.mark.parametrize("command", [["demo"], ["run", "RECIPE"]])
def test_run_and_demo_print_the_warning_and_exit_3_with_strict(command, tmp_path, monkeypatch, capsys):
    """The pipeline itself is stubbed with the real demo metrics (a class really lost 2.78 points there):
    the CLI's part is to print the warning and choose the exit code."""
    import prunekit.jobs.run

    seen = {}

    def fake_run(recipe, out, progress=True, class_drop=2.0, **others):  # others: --resume, --store, ...
        seen["class_drop"] = class_drop
        m = json.loads(FIXTURE.read_text())
        m["per_class_check"] = check_metrics(m, class_drop)
        return m

    monkeypatch.setattr(prunekit.jobs.run, "run_recipe", fake_run)
    recipe_file = tmp_path / "r.yaml"
    from prunekit.jobs import recipe

    recipe_file.write_text(recipe.builtin_text("edge-digits"))
    args = [str(recipe_file) if a == "RECIPE" else a for a in command] + ["--out", str(tmp_path / "o"), "-q"]
    code, out, err = call_main(monkeypatch, capsys, *args)
    assert code == 0 and "warning: per-class recall of pruned vs dense" in err and "class 6 -2.78" in err
    code, out, err = call_main(monkeypatch, capsys, *args, "--strict")
    assert code == 3 and "class 6 -2.78" in err and "report.html" in out
    code, out, err = call_main(monkeypatch, capsys, *args, "--strict", "--class-drop", "3")
    assert code == 0 and "warning" not in err and seen["class_drop"] == 3.0


def test_the_pipeline_records_the_check_and_agreement_with_the_given_threshold(tmp_path):
    """A tiny real run: metrics.json holds the per-class check at --class-drop and, for the second evaluated
    model, its agreement with the first; a negative threshold is refused before anything runs."""
    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    data = {
        "name": "tiny",
        "seed": 0,
        "model": {"builtin": "resnet-digits", "args": {"widths": [8], "blocks": 1}},
        "data": {"name": "digits", "batch_size": 256},
        "stages": [
            {"type": "train", "epochs": 1, "lr": 0.1},
            {"type": "evaluate", "label": "dense", "latency_runs": 2, "latency_warmup": 0},
            {"type": "export", "name": "dense"},
            {"type": "prune", "pattern": 0.8},
            {"type": "evaluate", "label": "pruned", "latency_runs": 2, "latency_warmup": 0},
            {"type": "export", "name": "pruned", "compressed": True},
        ],
    }
    with pytest.raises(PrunekitError, match="--class-drop must be >= 0"):
        run_recipe(recipe.from_dict(data), tmp_path / "never", progress=False, class_drop=-1)
    assert not (tmp_path / "never").exists()
    m = run_recipe(recipe.from_dict(data), tmp_path / "out", progress=False, class_drop=0.5)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["per_class_check"] == check_metrics(saved, 0.5) == m["per_class_check"]
    assert "agreement" not in saved["dense"] and saved["pruned"]["agreement"]["reference"] == "dense"
    agreement = saved["pruned"]["agreement"]
    assert agreement["clean"]["samples"] == sum(saved["dense"]["support"])
    assert len(agreement["perturbed"]) == 7  # 3 noise levels and 4 one-pixel shifts of the 8x8 digits
    parts = saved["pruned"]["compressed_parts"]
    assert (
        sum(parts[k] for k in ("value_bytes", "index_bytes", "scale_bytes", "file_overhead_bytes"))
        == (saved["pruned"]["compressed_size_bytes"])
    )
    for name in ("report.md", "report.html", "report-layer-sparsity.png", "report-per-class-recall.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
