"""Checkpoint and resume: a run killed (SIGKILL) at a checkpoint and resumed ends with exactly the masks,
metrics and log of an uninterrupted run with the same seed (bit-exact on CPU); a kill in the middle of
writing a checkpoint keeps the last good one; a resume with another recipe is refused in one line;
the checkpoint format round-trips nested training state exactly and holds no pickle."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fixtures.recipes import TINY
from prunekit.errors import PrunekitError
from prunekit.jobs import checkpoint as ckpt
from prunekit.jobs import recipe
from prunekit.jobs.run import run_recipe
from prunekit.jobs.runlog import read_log
from prunekit.rng import rng_state

CHECKPOINTS = 11
KILLER = Path(__file__).parents[1] / "fixtures" / "kill_at_checkpoint.py"
LABELS = ("dense", "pruned")


def comparable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything a run determines (latency and wall time are measured, so they vary)."""
    out = {"masks_sha256": metrics["masks_sha256"], "rounds": metrics["rounds"]}
    for label in LABELS:
        e = metrics[label]
        out[label] = {k: e[k] for k in ("accuracy", "per_class_recall", "nonzero_params", "layers")}
    out["size"] = metrics["pruned"]["size_bytes"]
    return out


def log_events(out: Path) -> list[dict[str, Any]]:
    """The log without its clock fields and without the resume marker."""
    drop = {"time", "time_s", "elapsed_s", "wall_time_s", "seq"}
    return [
        {k: v for k, v in e.items() if k not in drop}
        for e in read_log(out / "log.jsonl")
        if e["event"] != "resume"
    ]


def run_cli(
    recipe_file: Path, out: Path, *extra: str, kill_at: str | None = None
) -> subprocess.CompletedProcess:
    """``prunekit run`` in a fresh process; with ``kill_at`` it is SIGKILLed at that checkpoint
    (tests/fixtures/kill_at_checkpoint.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "prunekit"] if kill_at is None else [str(KILLER), kill_at]
    cmd = [sys.executable, *launcher, "run", str(recipe_file), "--out", str(out), "-q", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    recipe_file = root / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(TINY))
    out = root / "baseline"
    metrics = run_recipe(recipe.from_dict(TINY), out, progress=False)
    return recipe_file, out, metrics


def test_the_baseline_learns_and_checkpoints_as_counted(baseline):
    _, out, metrics = baseline
    assert metrics["dense"]["accuracy"] > 0.8  # a model that learned: equality below is not vacuous
    assert ckpt.read(out / "checkpoint" / "last.safetensors")["count"] == CHECKPOINTS
    assert ckpt.read(out / "checkpoint" / "previous.safetensors")["count"] == CHECKPOINTS - 1
    events = [e["event"] for e in read_log(out / "log.jsonl")]
    assert events.count("round") == 3 and events.count("epoch") == 4 and events[-1] == "done"
    assert [e["seq"] for e in read_log(out / "log.jsonl")] == list(range(len(events)))


@pytest.mark.slow  # a second full run (tests/cli/test_commands.py checks the same for masks and accuracy)
def test_same_seed_twice_gives_identical_masks_metrics_and_losses(baseline, tmp_path):
    _, out, metrics = baseline
    again = run_recipe(recipe.from_dict(TINY), tmp_path / "again", progress=False)
    assert comparable(again) == comparable(metrics)
    assert log_events(tmp_path / "again") == log_events(out)


def _resume_equals_baseline(baseline, out: Path) -> None:
    _, base_out, metrics = baseline
    resumed = run_recipe(recipe.from_dict(TINY), out, progress=False, resume=True)
    assert comparable(resumed) == comparable(metrics)
    assert log_events(out) == log_events(base_out)  # no line lost, none repeated
    assert [e["seq"] for e in read_log(out / "log.jsonl")] == list(range(len(read_log(out / "log.jsonl"))))
    for name in ("pruned.safetensors",):
        assert (out / name).read_bytes() == (base_out / name).read_bytes()


# 6: inside round 1's fine-tuning (the optimizer's moments, the loader position mid-epoch)
@pytest.mark.parametrize("kill_at", ["6"])
def test_sigkill_at_a_checkpoint_then_resume_equals_the_uninterrupted_run(baseline, tmp_path, kill_at):
    recipe_file, _, _ = baseline
    out = tmp_path / "killed"
    killed = run_cli(recipe_file, out, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "metrics.json").exists()
    assert ckpt.read(out / "checkpoint" / "last.safetensors")["count"] == int(kill_at)
    _resume_equals_baseline(baseline, out)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [str(n) for n in range(1, CHECKPOINTS + 1)])
def test_sigkill_at_every_checkpoint_then_resume_equals_the_uninterrupted_run(baseline, tmp_path, kill_at):
    test_sigkill_at_a_checkpoint_then_resume_equals_the_uninterrupted_run(baseline, tmp_path, kill_at)


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_keeps_the_last_good_one(baseline, tmp_path):
    recipe_file, _, _ = baseline
    out = tmp_path / "torn"
    killed = run_cli(recipe_file, out, kill_at="9:before-rename")  # checkpoint 9 written, not yet renamed
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = out / "checkpoint"
    assert [p.name for p in folder.glob(".next.*.tmp")]  # the torn write is there, under a temporary name
    assert ckpt.read(folder / "last.safetensors")["count"] == 8
    assert ckpt.read(folder / "previous.safetensors")["count"] == 7
    _resume_equals_baseline(baseline, out)
    assert not list(folder.glob(".next.*.tmp"))


def test_an_unreadable_last_checkpoint_falls_back_to_previous(baseline, tmp_path):
    _, base_out, _ = baseline
    out = tmp_path / "fallback"
    shutil.copytree(base_out / "checkpoint", out / "checkpoint")
    (out / "checkpoint" / "last.safetensors").write_bytes(b"\x00" * 100)
    state, path = ckpt.load_latest(out)
    assert path.name == "previous.safetensors" and state["count"] == CHECKPOINTS - 1


def _copy_checkpoint(base_out: Path, out: Path) -> None:
    shutil.copytree(base_out / "checkpoint", out / "checkpoint")


def _flip(path: Path, where: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_last_falls_back_to_previous_and_finishes_like_the_uninterrupted_run(
    baseline, tmp_path, caplog
):
    """Issue 20: flips in last.safetensors used to resume into another result (or a traceback); the
    checkpoint's SHA-256 now sends the run to previous.safetensors, whose continuation is the baseline's."""
    _, base_out, _ = baseline
    out = tmp_path / "flipped"
    _copy_checkpoint(base_out, out)
    for name in ("log.jsonl", "run.json"):
        shutil.copy(base_out / name, out / name)
    last = out / "checkpoint" / "last.safetensors"
    _flip(last, last.stat().st_size // 2)  # inside a tensor: the kind of flip that resumed silently
    with pytest.raises(PrunekitError, match="is damaged: its contents do not match the SHA-256"):
        ckpt.read(last)
    state, path = ckpt.load_latest(out)
    assert path.name == "previous.safetensors" and state["count"] == CHECKPOINTS - 1
    assert "resuming from" in caplog.text and "last.safetensors is damaged" in caplog.text
    _resume_equals_baseline(baseline, out)


def test_both_checkpoints_damaged_is_one_line_naming_each(baseline, tmp_path, monkeypatch, capsys):
    from prunekit.cli.commands import main

    recipe_file, base_out, _ = baseline
    out = tmp_path / "both"
    _copy_checkpoint(base_out, out)
    for name in ("last.safetensors", "previous.safetensors"):
        path = out / "checkpoint" / name
        _flip(path, path.stat().st_size - 7)
    with pytest.raises(PrunekitError) as info:
        ckpt.load_latest(out)
    message = str(info.value)
    assert "\n" not in message and "last.safetensors: is damaged" in message
    assert "previous.safetensors: is damaged" in message and "run without --resume" in message
    monkeypatch.setattr(
        sys, "argv", ["prunekit", "run", str(recipe_file), "--out", str(out), "-q", "--resume"]
    )
    with pytest.raises(SystemExit) as code:
        main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code.value.code == 2 and len(err) == 1 and "no intact checkpoint" in err[0]


def test_a_checkpoint_without_a_digest_is_not_resumed_from(tmp_path):
    """Format 1 checkpoints had no SHA-256: refused (a resume could not be trusted), with what to do."""
    from safetensors.torch import save as st_save

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    meta = {"format": "prunekit-checkpoint/1", "prunekit_checkpoint": json.dumps({"count": 1})}
    (folder / "last.safetensors").write_bytes(st_save({"t0": torch.zeros(2)}, metadata=meta))
    with pytest.raises(
        PrunekitError, match="older prunekit without an integrity check.*run without --resume"
    ):
        ckpt.read(folder / "last.safetensors")


def test_resume_with_another_recipe_is_refused_naming_the_difference(baseline, tmp_path):
    _, base_out, _ = baseline
    out = tmp_path / "other"
    _copy_checkpoint(base_out, out)
    changed = copy.deepcopy(TINY)
    changed["stages"][2]["pattern"] = 0.8
    changed["checkpoint"] = {"every_steps": 5}  # how often to checkpoint is not part of the identity
    with pytest.raises(PrunekitError) as info:
        run_recipe(recipe.from_dict(changed), out, progress=False, resume=True)
    message = str(info.value)
    assert "\n" not in message and "stages[2].pattern: 0.75 -> 0.8" in message
    assert "checkpoint" not in message.split(":", 1)[1].split("was written with")[1]
    assert not (out / "metrics.json").exists()


def test_the_cli_refuses_a_mismatching_resume_with_one_line_and_exit_2(
    baseline, tmp_path, monkeypatch, capsys
):
    from prunekit.cli.commands import main

    _, base_out, _ = baseline
    out = tmp_path / "cli"
    _copy_checkpoint(base_out, out)
    changed = copy.deepcopy(TINY)
    changed["seed"] = 1
    recipe_file = tmp_path / "changed.yaml"
    recipe_file.write_text(yaml.safe_dump(changed))
    monkeypatch.setattr(
        sys, "argv", ["prunekit", "run", str(recipe_file), "--out", str(out), "-q", "--resume"]
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: --resume: the recipe differs")
        and "seed: 0 -> 1" in lines[0]
    )


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(PrunekitError, match="no checkpoint to resume from"):
        run_recipe(recipe.from_dict(TINY), tmp_path / "empty", progress=False, resume=True)


def test_pack_round_trips_nested_training_state_exactly():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "rng": rng_state(),
        "t": (1, 2.5, None, "x"),
        "e": {},
        "l": [],
    }
    tensors: dict[str, torch.Tensor] = {}
    packed = ckpt.pack(state, tensors)
    back = ckpt.unpack(json.loads(json.dumps(packed)), tensors)
    assert back["t"] == state["t"] and back["e"] == {} and back["l"] == []
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys stay ints
    for key, entry in state["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(back["optimizer"]["state"][key][name], value)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["rng"]["python"] == state["rng"]["python"]
    numpy_back, numpy_state = back["rng"]["numpy"], state["rng"]["numpy"]
    assert numpy_back[0] == numpy_state[0] and np.array_equal(numpy_back[1], numpy_state[1])
    assert numpy_back[1].dtype == np.uint32 and numpy_back[2:] == numpy_state[2:]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    opt.load_state_dict(back["optimizer"])  # torch accepts it back


def test_a_checkpoint_file_is_safetensors_without_pickle(baseline):
    _, out, _ = baseline
    data = (out / "checkpoint" / "last.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == ckpt.FORMAT
    assert b"\x80\x04" not in data[: 8 + header_len]  # no pickle protocol marker in the header
    with pytest.raises(PrunekitError, match="not a readable prunekit checkpoint"):
        bad = out.parent / "pickle.safetensors"
        torch.save({"x": 1}, bad)
        ckpt.read(bad)


def _variant(stages: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    data = copy.deepcopy(TINY)
    data.update(seed=seed, stages=stages, checkpoint={"every_steps": 10})
    return data


EVAL = {"latency_runs": 2, "latency_warmup": 0}
TRAIN = {"type": "train", "epochs": 1, "lr": 0.01, "optimizer": "adam"}
VARIANTS = {
    # AGP with movement: the criterion's running scores and the sparsifier's step are in the checkpoint;
    # checkpoint 10 is inside the AGP fine-tuning (34 dense steps, then 68 AGP steps)
    "agp-movement": (
        _variant(
            [
                TRAIN,
                {
                    "type": "prune",
                    "pattern": 0.6,
                    "criterion": "movement",
                    "schedule": {"type": "agp", "end": 50, "every": 5},
                    "finetune": {"epochs": 2, "lr": 0.002},
                },
                {"type": "evaluate", "label": "pruned", **EVAL},
            ],
            seed=3,
        ),
        "10",
    ),
    # a structured stage before the pruning: the architecture is rebuilt from the prune log on resume,
    # and the dense model evaluated before it is kept for the latency timing; checkpoint 12 is in round 2
    "structured-then-prune": (
        _variant(
            [
                TRAIN,
                {"type": "evaluate", "label": "dense", **EVAL},
                {"type": "structured", "ratio": 0.25, "round_to": 1, "finetune": {"epochs": 1, "lr": 0.002}},
                {"type": "evaluate", "label": "slim", **EVAL},
                {
                    "type": "prune",
                    "pattern": 0.5,
                    "schedule": {"type": "iterative", "rate": 0.3},
                    "finetune": {"epochs": 1, "lr": 0.002},
                },
                {"type": "evaluate", "label": "pruned", **EVAL},
            ],
            seed=1,
        ),
        "12",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_resume_is_exact_for_agp_movement_and_after_a_structured_stage(tmp_path, name):
    data, kill_at = VARIANTS[name]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    base = run_recipe(recipe.from_dict(data), tmp_path / "base", progress=False)
    killed = run_cli(recipe_file, tmp_path / "killed", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_recipe(recipe.from_dict(data), tmp_path / "killed", progress=False, resume=True)
    labels = [k for k, v in base.items() if isinstance(v, dict) and "accuracy" in v]
    assert resumed["masks_sha256"] == base["masks_sha256"] and resumed["rounds"] == base["rounds"]
    for label in labels:
        assert resumed[label]["accuracy"] == base[label]["accuracy"]
        assert resumed[label]["layers"] == base[label]["layers"]
    assert log_events(tmp_path / "killed") == log_events(tmp_path / "base")
