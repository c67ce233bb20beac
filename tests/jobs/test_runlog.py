"""The run log: one JSON object per line with consecutive ``seq``; on resume it is cut back to the
checkpoint's offset (no line from the replayed part twice, a torn last line gone) and continues;
TensorBoard is optional and its absence is a one-line error naming the package to install."""

from __future__ import annotations

import importlib.util
import json

import pytest

from prunekit.errors import PrunekitError
from prunekit.jobs.runlog import RunLog, read_log

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_lines_are_json_with_consecutive_seq(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    for i in range(3):
        log.write("epoch", epoch=i, loss=1.0 / (i + 1))
    log.close()
    events = read_log(tmp_path / "log.jsonl")
    assert [e["seq"] for e in events] == [0, 1, 2]
    assert [e["epoch"] for e in events] == [0, 1, 2] and all(e["event"] == "epoch" for e in events)


def test_resume_cuts_the_replayed_part_and_a_torn_line_then_continues(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RunLog(path)
    log.write("round", round=0)
    at = log.position()  # what a checkpoint stores
    log.write("round", round=1)  # after the checkpoint: the resumed run does this again
    log.close()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"seq": 2, "event": "rou')  # killed mid-write
    resumed = RunLog(path, resume_at=at)
    resumed.write("round", round=1)
    resumed.write("done")
    resumed.close()
    events = read_log(path)  # every line parses: the torn one is gone
    assert [(e["seq"], e["event"], e.get("round")) for e in events] == [
        (0, "round", 0),
        (1, "round", 1),
        (2, "done", None),
    ]


def test_a_fresh_log_replaces_an_old_one(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"seq": 0, "event": "old"}) + "\n")
    log = RunLog(path)
    log.write("stage", stage=0)
    log.close()
    assert [e["event"] for e in read_log(path)] == ["stage"]


def test_a_disabled_log_writes_nothing(tmp_path):
    log = RunLog(tmp_path / "sub" / "log.jsonl", enabled=False)  # the other ranks of a distributed run
    log.write("epoch", loss=1.0)
    log.close()
    assert not (tmp_path / "sub").exists()


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Hide an installed tensorboard package (find_spec answers None), so the error path runs anyway."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, no_tensorboard):
    with pytest.raises(PrunekitError) as info:
        RunLog(tmp_path / "log.jsonl", tensorboard=tmp_path / "tb")
    assert "pip install tensorboard" in str(info.value) and "\n" not in str(info.value)


def test_a_run_asking_for_tensorboard_without_it_fails_before_any_output(tmp_path, no_tensorboard):
    from fixtures.recipes import TINY
    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    with pytest.raises(PrunekitError, match="pip install tensorboard"):
        run_recipe(recipe.from_dict(TINY), tmp_path / "out", progress=False, tensorboard=tmp_path / "tb")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package is not installed")
def test_tensorboard_gets_the_numeric_fields_as_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path / "log.jsonl", tensorboard=tmp_path / "tb")
    log.write("round", round=0, val_accuracy=0.5, targeted_sparsity=0.0)
    log.write("round", round=1, val_accuracy=0.75, targeted_sparsity=0.5)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    values = [(s.step, s.value) for s in events.Scalars("round/val_accuracy")]
    assert values == [(0, 0.5), (1, 0.75)]
    assert "round/round" not in events.Tags()["scalars"]  # positions are not plotted
