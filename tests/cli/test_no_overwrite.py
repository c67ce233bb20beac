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


def test_structured_out_holding_its_model_is_refused(artifact, monkeypatch, capsys):
    model = artifact.parent / "model.safetensors"  # what `structured` writes into --out
    artifact.rename(model)
    original = model.read_bytes()
    code, _, err = call_main(
        monkeypatch, capsys, "structured", "--model", str(model), "--out", str(model.parent)
    )
    assert code == 2 and "is --model itself" in err and len(err.strip().splitlines()) == 1
    assert model.read_bytes() == original


def test_a_damaged_compress_source_is_one_line(artifact, tmp_path, monkeypatch, capsys):
    data = bytearray(artifact.read_bytes())
    data[-5] ^= 0x10  # inside a tensor: the artifact's SHA-256 catches it
    artifact.write_bytes(bytes(data))
    code, _, err = call_main(monkeypatch, capsys, "compress", str(artifact), "--out", str(tmp_path / "c.st"))
    assert code == 2 and "corrupted" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.st").exists()


def test_a_structured_directory_naming_a_factory_does_not_import_it(tmp_path, monkeypatch, capsys):
    """metrics.json of a `structured` output names the model; a factory reference read from it is refused
    (it would import and call whatever the file names), never run."""
    import json
    import sys

    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "metrics.json").write_text(
        json.dumps({"model": "antigravity:fly", "input_shape": [1, 1, 8, 8]})
    )
    (folder / "prune_log.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    code, _, err = call_main(
        monkeypatch, capsys, "export", "onnx", str(folder), "--out", str(tmp_path / "m.onnx")
    )
    assert code == 2 and "a file never makes prunekit import code" in err and "antigravity" not in sys.modules
