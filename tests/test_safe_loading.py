"""Nothing prunekit loads can execute code: a malicious pickle (whose ``__reduce__`` creates a marker file)
given to every prunekit loader that reads model files is refused with a one-line PrunekitError and the
marker never appears; recipes are YAML parsed safely, so a Python object tag is an error, not a call.

The fixtures are checked to be live: unpickling them unsafely does create the marker."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError


class _Payload:
    """Unpickling this calls ``pathlib.Path(marker).touch()``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _raw_pickle(marker: pathlib.Path) -> bytes:
    return pickle.dumps({"weight": _Payload(marker)})


def _torch_pickle(marker: pathlib.Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "hook": _Payload(marker)}, buffer)
    return buffer.getvalue()


FORMATS = {"pickle": _raw_pickle, "torch.save": _torch_pickle}


@pytest.fixture(params=sorted(FORMATS))
def evil(request, tmp_path):
    """(bytes of a malicious file, the marker path it would create)."""
    marker = tmp_path / f"pwned-{request.param.replace('.', '-')}"
    return FORMATS[request.param](marker), marker


def test_the_payloads_are_live(tmp_path):
    marker = tmp_path / "live"
    pickle.loads(_raw_pickle(marker))
    assert marker.is_file()
    marker.unlink()
    torch.load(io.BytesIO(_torch_pickle(marker)), weights_only=False)  # the unsafe way prunekit never uses
    assert marker.is_file()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):  # torch's safe mode refuses it
        torch.load(io.BytesIO(_torch_pickle(marker)), weights_only=True)
    assert not marker.exists()


def _tiny() -> nn.Module:
    from prunekit.models import build_model

    return build_model("resnet-digits", {"widths": [4, 4, 4], "blocks": 1})


def _loaders(tmp_path: pathlib.Path, data: bytes):
    """(name, call) for every loader of model/weight files, each pointed at the malicious ``data``."""
    from prunekit.artifact import inspect_artifact, load_artifact, read_artifact
    from prunekit.compress import load_compressed
    from prunekit.compress.container import read_header
    from prunekit.compress.source import read_source
    from prunekit.jobs import checkpoint
    from prunekit.structured import storage

    file = tmp_path / "model.safetensors"
    file.write_bytes(data)
    (tmp_path / "ckpt" / "checkpoint").mkdir(parents=True)
    (tmp_path / "ckpt" / "checkpoint" / "last.safetensors").write_bytes(data)
    structured = tmp_path / "structured"
    structured.mkdir()
    (structured / storage.WEIGHTS).write_bytes(data)
    (structured / storage.LOG).write_text(json.dumps({"format": storage.FORMAT, "removed": {}}))  # no-op plan
    return [
        ("read_artifact", lambda: read_artifact(file)),
        ("load_artifact", lambda: load_artifact(file)),
        ("load_artifact into a model", lambda: load_artifact(file, _tiny())),
        ("inspect_artifact", lambda: inspect_artifact(file)),
        ("load_compressed", lambda: load_compressed(file)),
        ("compressed read_header", lambda: read_header(file)),
        ("compress read_source", lambda: read_source(file)),
        ("checkpoint.read", lambda: checkpoint.read(file)),
        ("checkpoint.load_latest", lambda: checkpoint.load_latest(tmp_path / "ckpt")),
        ("structured storage.load", lambda: storage.load(_tiny(), structured)),
    ]


def test_every_model_loader_refuses_a_malicious_pickle(tmp_path, evil):
    data, marker = evil
    for name, load in _loaders(tmp_path, data):
        with pytest.raises(PrunekitError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and len(message) < 400, (name, message)
        assert not marker.exists(), f"{name} executed the pickle"


def test_npz_data_with_pickled_objects_is_refused(tmp_path, evil):
    from prunekit.data import load_splits

    data, marker = evil
    renamed = tmp_path / "data.npz"
    renamed.write_bytes(data)  # a pickle that calls itself .npz (torch.save's zip opens as an archive)
    with pytest.raises(PrunekitError, match="cannot read|must hold arrays named 'x' and 'y'"):
        load_splits("npz", renamed)
    # a real .npz whose 'x' is an object array: numpy stores it pickled
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([_Payload(marker)] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(PrunekitError, match="cannot read .*pickle"):
        load_splits("npz", objects)
    assert not marker.exists()


def test_a_pickled_checkpoint_inside_a_safetensors_zip_is_still_refused(tmp_path):
    """torch.save writes a zip; a file that *is* a zip of a pickle with a .safetensors name is refused
    by the safetensors parser, not handed to torch."""
    from prunekit.jobs import checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "last.safetensors"
    path.write_bytes(_torch_pickle(marker))
    assert zipfile.is_zipfile(path)
    with pytest.raises(PrunekitError, match="not a readable prunekit checkpoint"):
        checkpoint.read(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/apply:pathlib.Path.touch [{marker}]",
        "!!python/object/new:pathlib.Path [{marker}]",
        "!!python/name:os.system",
    ],
)
def test_recipe_yaml_with_a_python_tag_is_refused(tmp_path, tag):
    from prunekit.jobs import recipe

    marker = tmp_path / "pwned"
    text = (
        "name: evil\n"
        f"description: {tag.format(marker=marker)}\n"
        "model: {builtin: resnet-digits}\n"
        "stages: [{type: train, epochs: 1, lr: 0.1}]\n"
    )
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(
        PrunekitError, match=r"recipe .*evil.yaml: not valid YAML: could not determine a constructor"
    ):
        recipe.load(path)
    assert not marker.exists()


def test_recipe_yaml_parsing_is_the_safe_loader():
    """Plain YAML still works (the safe loader is no stricter about ordinary values)."""
    from prunekit.jobs import recipe

    r = recipe.load_builtin("edge-digits")
    assert r.name == "edge-digits"


@pytest.mark.slow  # imports transformers
def test_a_hugging_face_directory_with_a_malicious_pytorch_bin_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from prunekit.llm.load import load_causal_lm

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "pytorch_model.bin").write_bytes(_torch_pickle(marker))
    with pytest.raises(PrunekitError, match="refused to unpickle its PyTorch weights file") as info:
        load_causal_lm(tmp_path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
