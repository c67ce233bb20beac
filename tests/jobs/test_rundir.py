"""A run directory belongs to one run: another run's files are refused without --resume or --force,
--force deletes exactly the earlier run's files (never the user's, never a file the recipe reads), and
no export replaces a file the recipe reads."""

from __future__ import annotations

import copy
import shutil
import sys

import pytest
import yaml

from prunekit.errors import PrunekitError
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe
from prunekit.jobs.rundir import RUN_FILE, earlier_run

FAST = {
    "name": "fast",
    "seed": 0,
    "threads": 1,
    "model": {"builtin": "resnet-digits", "args": {"widths": [4], "blocks": 1}},
    "data": {"name": "digits", "batch_size": 256},
    "stages": [{"type": "train", "epochs": 1, "lr": 0.01}, {"type": "export", "name": "m"}],
}


def _recipe(**changes):
    data = copy.deepcopy(FAST)
    data.update(changes)
    return recipe.from_dict(data)


def _files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run's directory (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("rundir") / "run"
    run_recipe(_recipe(), out, progress=False)
    return out


def test_a_run_marks_its_directory(done):
    assert (done / RUN_FILE).is_file() and earlier_run(done).name == "fast"
    assert earlier_run(done).exports == ["m"]


def test_another_run_into_it_is_refused_before_any_work(done, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(done, out)
    before = _files(out)
    with pytest.raises(PrunekitError) as info:
        run_recipe(_recipe(seed=1), out, progress=False)
    message = str(info.value)
    assert "holds the files of an earlier run (recipe 'fast', started" in message
    assert "--resume to continue it" in message and "--force" in message and "\n" not in message
    assert _files(out) == before  # nothing deleted, nothing written (the old run lost its checkpoints here)


def test_force_deletes_exactly_the_earlier_runs_files(done, tmp_path):
    out = tmp_path / "forced"
    shutil.copytree(done, out)
    (out / "notes.txt").write_text("mine")
    other = _recipe(stages=[{"type": "train", "epochs": 1, "lr": 0.01}, {"type": "export", "name": "n"}])
    run_recipe(other, out, progress=False, force=True)
    names = {p.name for p in out.iterdir()}
    assert "m.safetensors" not in names  # the earlier run's export is gone: the directory holds one run
    assert {"n.safetensors", "notes.txt", RUN_FILE, "metrics.json", "checkpoint"} <= names
    assert (out / "notes.txt").read_text() == "mine"
    assert earlier_run(out).exports == ["n"]


def test_force_never_deletes_a_file_the_recipe_reads(done, tmp_path):
    out = tmp_path / "reads"
    shutil.copytree(done, out)
    reads = _recipe(model={"artifact": str(out / "m.safetensors")}, stages=[{"type": "export", "name": "p"}])
    with pytest.raises(PrunekitError, match=r"--force would delete .*m\.safetensors, which the recipe reads"):
        run_recipe(reads, out, progress=False, force=True)
    assert (out / "m.safetensors").read_bytes() == (done / "m.safetensors").read_bytes()


def test_an_export_over_the_recipes_own_input_is_refused(done, tmp_path):
    out = tmp_path / "own"
    out.mkdir()
    shutil.copy(done / "m.safetensors", out / "m.safetensors")
    same = _recipe(model={"artifact": str(out / "m.safetensors")}, stages=[{"type": "export", "name": "m"}])
    with pytest.raises(PrunekitError, match=r"would write m\.safetensors over .*which the recipe reads"):
        run_recipe(same, out, progress=False)
    assert (out / "m.safetensors").read_bytes() == (done / "m.safetensors").read_bytes()


def test_resume_needs_the_same_recipe_and_not_force(done, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(done, out)
    with pytest.raises(
        PrunekitError, match=r"the recipe differs from the one .*run\.json was written with: seed: 0 -> 3"
    ):
        run_recipe(_recipe(seed=3), out, progress=False, resume=True)
    with pytest.raises(PrunekitError, match="give one of them"):
        run_recipe(_recipe(), out, progress=False, resume=True, force=True)


def test_a_directory_from_before_run_json_counts_as_a_run(done, tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    shutil.copy(done / "metrics.json", out / "metrics.json")
    assert earlier_run(out).name == "fast"
    with pytest.raises(PrunekitError, match="holds the files of an earlier run"):
        run_recipe(_recipe(), out, progress=False)
    (out / "metrics.json").unlink()
    (out / "notes.txt").write_text("mine")
    assert earlier_run(out) is None  # a directory of the user's own files is not a run's


def test_the_cli_says_it_in_one_line(done, tmp_path, monkeypatch, capsys):
    from prunekit.cli.commands import main

    out = tmp_path / "cli"
    shutil.copytree(done, out)
    recipe_file = tmp_path / "fast.yaml"
    recipe_file.write_text(yaml.safe_dump(FAST))
    monkeypatch.setattr(sys, "argv", ["prunekit", "run", str(recipe_file), "--out", str(out), "-q"])
    with pytest.raises(SystemExit) as code:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and err[0].startswith("error: --out")


def test_force_deletes_nothing_outside_the_directory(done, tmp_path):
    """The earlier run's export names come from its files: a name that is a path is ignored, never
    followed out of --out."""
    import json

    out = tmp_path / "d" / "run"
    shutil.copytree(done, out)
    victim = tmp_path / "d" / "victim.safetensors"
    victim.write_bytes(b"keep me")
    marker = json.loads((out / RUN_FILE).read_text())
    marker["recipe"]["stages"].append({"type": "export", "name": "../victim"})
    (out / RUN_FILE).write_text(json.dumps(marker))
    assert earlier_run(out).exports == ["m"]
    run_recipe(_recipe(), out, progress=False, force=True)
    assert victim.read_bytes() == b"keep me"
