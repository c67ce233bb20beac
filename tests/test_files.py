"""Atomic writes: the final name holds either the old complete file or the new complete file, never a
partial one, and no temporary file is left behind whatever happens."""

from __future__ import annotations

import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit.files as files
from prunekit.files import atomic_write_bytes, atomic_write_json, atomic_write_text

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=5000), st.binary(max_size=5000))
def test_write_then_replace_leaves_exactly_the_new_bytes(tmp_path_factory, first, second):
    directory = tmp_path_factory.mktemp("w")
    path = directory / "out.bin"
    assert atomic_write_bytes(path, first) == path
    assert path.read_bytes() == first
    atomic_write_bytes(path, second)
    assert path.read_bytes() == second
    assert names(directory) == ["out.bin"]


@settings(max_examples=30, deadline=None)
@given(st.text())
def test_text_is_utf8(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("t") / "out.txt"
    atomic_write_text(path, text)
    assert path.read_bytes() == text.encode("utf-8")


@settings(max_examples=30, deadline=None)
@given(json_values)
def test_json_round_trips(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("j") / "out.json"
    atomic_write_json(path, value)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == value
    assert text.endswith("\n")


def test_missing_parent_directories_are_created(tmp_path):
    path = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(path, "x")
    assert path.read_text() == "x"
    assert names(path.parent) == ["c.txt"]


def _boom(*args, **kwargs):
    raise OSError("simulated failure")


@pytest.mark.parametrize("fail_in", ["replace", "fsync"])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch, fail_in, existing):
    path = tmp_path / "out.bin"
    if existing:
        atomic_write_bytes(path, b"old complete contents")
    monkeypatch.setattr(files.os, fail_in, _boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(path, b"new contents" * 1000)
    monkeypatch.undo()
    if existing:
        assert names(tmp_path) == ["out.bin"]
        assert path.read_bytes() == b"old complete contents"
    else:
        assert names(tmp_path) == []


def test_bad_data_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "out.bin", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "out.json", {"x": object()})
    assert names(tmp_path) == []


def test_interrupt_mid_write_leaves_nothing(tmp_path, monkeypatch):
    """Even a KeyboardInterrupt (a BaseException) cleans up the temporary file."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "out.txt", "x")
    monkeypatch.undo()
    assert names(tmp_path) == []


def test_replace_is_a_rename_of_a_complete_file(tmp_path, monkeypatch):
    """At the moment of the rename the temporary file already holds every byte, in the same directory."""
    seen = {}
    real_replace = os.replace

    def spy(src, dst):
        seen["src"], seen["dst"] = os.fspath(src), os.fspath(dst)
        with open(src, "rb") as handle:
            seen["data"] = handle.read()
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    data = os.urandom(100_000)
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, data)
    assert seen["data"] == data
    assert seen["dst"] == str(path)
    assert os.path.dirname(seen["src"]) == str(tmp_path)  # same file system: the rename is atomic
    assert os.path.basename(seen["src"]).startswith(".out.bin.")


def test_new_files_get_the_usual_permissions(tmp_path):
    """Like open(): 0o666 less the umask (a bare mkstemp would make every output owner-only 0o600)."""
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(umask)


def test_replacing_keeps_the_existing_permissions(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_staged_directory_appears_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="mid-save"), files.staged_directory(out) as staging:
        (staging / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("mid-save")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory
    with files.staged_directory(out) as staging:
        (staging / "model.safetensors").write_bytes(b"one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "model.safetensors").read_bytes() == b"one"


def test_a_staged_save_into_an_existing_directory_replaces_only_its_own_kind_of_files(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (out / "README.md").write_text("the user's notes")
    with pytest.raises(RuntimeError), files.staged_directory(out, replaces=("*.safetensors",)) as staging:
        (staging / "model.safetensors").write_bytes(b"new")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model-00001-of-00002.safetensors"]
    with files.staged_directory(out, replaces=("*.safetensors",)) as staging:
        (staging / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]  # stale shard gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(files.PrunekitError, match="not a directory"),
        files.staged_directory(tmp_path / "file"),
    ):
        pass
