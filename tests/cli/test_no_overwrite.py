"""No command replaces its own input: ``--out`` equal to the source (by another spelling, a symlink or a
hard link too) is one line, and the source is byte for byte what it was."""

from __future__ import annotations

import os

import pytest
import torch

from fixtures.cli import call_main
from prunekit.artifact import save_artifact
from prunekit.models import build_model


@pytest.fixture
def artifact(tmp_path):
    torch.manual_seed(0)
    args = {"widths": [4], "blocks": 1}
    path = tmp_path / "a.safetensors"
    save_artifact(
        path, build_model("resnet-digits", args), model_info={"name": "resnet-digits", "args": args}
    )
    return path


def _spellings(path):
    """The same file as given, through '..', through a symlink and through a hard link."""
    link, hard = path.parent / "link.safetensors", path.parent / "hard.safetensors"
    link.symlink_to(path)
    os.link(path, hard)
    return [str(path), str(path.parent / ".." / path.parent.name / path.name), str(link), str(hard)]


@pytest.mark.parametrize(
    "command",
    [
        ["compress", "{src}", "--out", "{out}", "--dtype", "int8"],
        ["export", "onnx", "{src}", "--out", "{out}"],
        ["export", "c", "{src}", "--out", "{out}", "--no-check"],
    ],
    ids=["compress", "export onnx", "export c"],
)
def test_out_equal_to_the_source_is_refused(artifact, command, monkeypatch, capsys):
    original = artifact.read_bytes()
    for out in _spellings(artifact):
        args = [a.format(src=artifact, out=out) for a in command]
        code, _, err = call_main(monkeypatch, capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "is SOURCE itself" in lines[0], (out, err)
        assert artifact.read_bytes() == original
