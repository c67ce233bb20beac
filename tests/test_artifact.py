"""Artifacts: bit-exact round trips (weights and masks), masks that keep working after loading, every
corruption a clear PrunekitError, atomic writes, no pickle, and an inspect table that adds up."""

from __future__ import annotations

import ast
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch.nn.utils import parametrize

import prunekit.artifact as artifact_module
from prunekit.analysis.sparsity import count_params, effective_parameters
from prunekit.artifact import inspect_artifact, load_artifact, read_artifact, save_artifact
from prunekit.errors import PrunekitError
from prunekit.masking import get_masks, mask_of, weight_parameter
from prunekit.models import SmallResNet
from prunekit.sparsifier import Sparsifier
from prunekit.targets import Targets

ARGS = {"widths": [4, 8], "blocks": 1}
INFO = {"name": "resnet-digits", "args": ARGS}


def pruned_model(pattern: str = "0.5", seed: int = 0) -> tuple[SmallResNet, Sparsifier]:
    torch.manual_seed(seed)
    model = SmallResNet(**ARGS)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so buffers are part of the round trip
        for _ in range(2):
            model(torch.randn(16, 1, 8, 8))
    targets = Targets(exclude=("stem.0",)) if ":" in pattern else None  # the stem has 1 input channel
    sparsifier = Sparsifier(model, pattern, group="global" if ":" not in pattern else None, targets=targets)
    sparsifier.prepare()
    sparsifier.prune()
    return model.eval(), sparsifier


def zero_a_kept_weight(model: SmallResNet) -> tuple[str, tuple[int, ...]]:
    """Set one kept (mask True) weight to exactly 0.0; returns the layer and index."""
    name, mask = sorted(get_masks(model).items())[0]
    index = tuple(int(i) for i in mask.nonzero()[0])
    with torch.no_grad():
        weight_parameter(model.get_submodule(name))[index] = 0.0
    return name, index


@pytest.fixture
def saved(tmp_path):
    model, sparsifier = pruned_model()
    path = tmp_path / "m.safetensors"
    size = save_artifact(path, model, model_info=INFO, specs=sparsifier.layer_specs())
    return path, model, sparsifier, size


def example(seed: int = 1) -> torch.Tensor:
    return torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("pattern", ["0.5", "0.0", "2:4"])
@pytest.mark.parametrize("into_given_model", [False, True])
def test_round_trip_is_bit_exact(tmp_path, pattern, into_given_model):
    model, sparsifier = pruned_model(pattern)
    layer, index = zero_a_kept_weight(model)
    path = tmp_path / "m.safetensors"
    save_artifact(path, model, model_info=INFO, specs=sparsifier.layer_specs())

    target = SmallResNet(**ARGS) if into_given_model else None
    loaded, info = load_artifact(path, model=target)
    loaded.eval()
    if into_given_model:
        assert loaded is target
    with torch.no_grad():
        assert torch.equal(loaded(example()), model(example()))
    for key, value in effective_parameters(model).items():
        assert torch.equal(effective_parameters(loaded)[key], value), key
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key:
            assert torch.equal(loaded.state_dict()[key], value), key

    masks = get_masks(model)
    assert info.masks.keys() == masks.keys() == get_masks(loaded).keys()
    for name, mask in masks.items():
        assert info.masks[name].dtype == torch.bool
        assert torch.equal(info.masks[name], mask), name
        assert torch.equal(get_masks(loaded)[name], mask), name
    # the kept weight that happens to be zero is still "keep": the mask is stored, not inferred
    assert bool(info.masks[layer][index]) and float(loaded.get_submodule(layer).weight.detach()[index]) == 0.0
    assert info.specs == sparsifier.layer_specs()
    assert info.model == INFO


def test_save_load_save_gives_the_same_bytes(saved, tmp_path):
    path, _, _, _ = saved
    loaded, info = load_artifact(path)
    again = tmp_path / "again.safetensors"
    save_artifact(again, loaded, model_info=info.model, specs=info.specs, extra=info.extra)
    assert again.read_bytes() == path.read_bytes()


def test_save_returns_the_file_size(saved):
    path, _, _, size = saved
    assert size == path.stat().st_size == read_artifact(path)[1].size_bytes


def test_extra_metadata_round_trips(tmp_path):
    model, sparsifier = pruned_model()
    extra = {"recipe": "tiny", "stages": [{"type": "prune", "pattern": 0.5}]}
    path = tmp_path / "m.safetensors"
    save_artifact(path, model, model_info=INFO, specs=sparsifier.layer_specs(), extra=extra)
    assert read_artifact(path)[1].extra == extra


def test_masked_load_reattaches_masks_that_survive_optimizers(saved):
    path, model, _, _ = saved
    masks = get_masks(model)
    for optimizer_cls, kwargs in [
        (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 0.5, "weight_decay": 0.1}),
    ]:
        loaded, _ = load_artifact(path, masked=True)
        for name in masks:
            assert parametrize.is_parametrized(loaded.get_submodule(name), "weight")
        loaded.train()
        optimizer = optimizer_cls(loaded.parameters(), **kwargs)
        for step in range(3):
            optimizer.zero_grad()
            loaded(example(step)).square().sum().backward()
            optimizer.step()
        for name, mask in masks.items():
            module = loaded.get_submodule(name)
            assert torch.all(module.weight[~mask] == 0), name
            assert torch.equal(get_masks(loaded)[name], mask)
            assert torch.any(module.weight[mask] != weight_parameter(model.get_submodule(name))[mask])


def test_unmasked_load_gives_plain_modules_with_the_zeros(saved):
    path, model, _, _ = saved
    loaded, info = load_artifact(path, masked=False)
    assert get_masks(loaded) == {}
    for name, mask in info.masks.items():
        module = loaded.get_submodule(name)
        assert mask_of(module) is None and not parametrize.is_parametrized(module)
        assert torch.all(module.weight[~mask] == 0)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(example()), model(example()))


def test_dense_model_without_masks_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SmallResNet(**ARGS).eval()
    path = tmp_path / "d.safetensors"
    save_artifact(path, model, model_info=INFO)
    loaded, info = load_artifact(path)
    assert info.masks == {} and info.specs == {} and get_masks(loaded) == {}
    with torch.no_grad():
        assert torch.equal(loaded.eval()(example()), model(example()))


# ------------------------------------------------------------------------------------------- corruption


def header_length(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def corrupt(path: Path, out: Path, position: int) -> Path:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0x01
    out.write_bytes(bytes(raw))
    return out


def test_flipped_byte_in_the_data_area_is_a_checksum_error(saved, tmp_path):
    path, _, _, _ = saved
    raw = path.read_bytes()
    start = 8 + header_length(raw)
    positions = sorted({start, len(raw) - 1, *range(start, len(raw), max(1, (len(raw) - start) // 40))})
    for position in positions:
        bad = corrupt(path, tmp_path / "bad.safetensors", position)
        with pytest.raises(PrunekitError, match=r"corrupted.*SHA-256") as info:
            load_artifact(bad)
        assert "\n" not in str(info.value)


def test_any_flipped_byte_in_the_header_is_an_error_never_silent(saved, tmp_path):
    """The specs, mask names and model arguments live in the header: a flip there must not load."""
    path, _, _, _ = saved
    raw = path.read_bytes()
    for position in range(0, 8 + header_length(raw), 3):
        bad = corrupt(path, tmp_path / "bad.safetensors", position)
        with pytest.raises(PrunekitError):
            read_artifact(bad)


def test_edited_spec_in_the_header_is_detected(saved, tmp_path):
    path, _, _, _ = saved
    raw = path.read_bytes()
    text = raw.replace(b'\\"sparsity\\": 0.5', b'\\"sparsity\\": 0.4', 1)
    assert text != raw and len(text) == len(raw)
    (tmp_path / "edited.safetensors").write_bytes(text)
    with pytest.raises(PrunekitError, match="SHA-256"):
        read_artifact(tmp_path / "edited.safetensors")


def test_truncated_file_is_an_error(saved, tmp_path):
    path, _, _, _ = saved
    raw = path.read_bytes()
    bad = tmp_path / "short.safetensors"
    for cut in sorted({0, 1, 7, 8, 9, 100, 8 + header_length(raw), len(raw) // 2, len(raw) - 1}):
        bad.write_bytes(raw[:cut])
        with pytest.raises(PrunekitError, match=r"corrupted|truncated") as info:
            load_artifact(bad)
        assert "\n" not in str(info.value)


def test_non_prunekit_files_are_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(PrunekitError, match="not a prunekit file"):
        load_artifact(plain)

    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(other), metadata={"prunekit": '{"format": "x"}'})
    with pytest.raises(PrunekitError, match="unsupported format"):
        load_artifact(other)

    listed = tmp_path / "list.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(listed), metadata={"prunekit": "[1, 2]"})
    with pytest.raises(PrunekitError):
        load_artifact(listed)

    text = tmp_path / "text.safetensors"
    text.write_text("hello, not a tensor file")
    with pytest.raises(PrunekitError):
        load_artifact(text)

    pickled = tmp_path / "pickled.safetensors"
    torch.save(SmallResNet(**ARGS).state_dict(), pickled)
    with pytest.raises(PrunekitError):
        load_artifact(pickled)


def test_newer_format_version_asks_for_an_upgrade(tmp_path):
    path = tmp_path / "new.safetensors"
    header = {"format": artifact_module.FORMAT, "format_version": artifact_module.FORMAT_VERSION + 1}
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path), metadata={"prunekit": json.dumps(header)})
    with pytest.raises(PrunekitError, match="upgrade prunekit"):
        load_artifact(path)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"format_version": "1"}, "format_version '1'"),
        ({"format_version": None}, "format_version None"),
        ({"model": "resnet-digits"}, "'model' must be null"),
        ({"model": {"args": {}}}, "'model' must be null"),
    ],
)
def test_hand_made_header_with_bad_fields_is_a_clear_error(tmp_path, changes, needle):
    # a header with a valid checksum can still be malformed (written by hand or by another tool)
    tensors = {"fc.weight": torch.zeros(2, 2)}
    header = {"format": artifact_module.FORMAT, "format_version": 1, "masks": {}, "specs": {}, "model": None}
    header.update(changes)
    header["sha256"] = artifact_module._digest(tensors, header)
    path = tmp_path / "hand.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"prunekit": json.dumps(header)})
    with pytest.raises(PrunekitError, match="malformed prunekit header") as info:
        load_artifact(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PrunekitError, match="artifact not found"):
        load_artifact(tmp_path / "nope.safetensors")


def test_wrong_architecture_is_an_error(saved):
    path, _, _, _ = saved
    with pytest.raises(PrunekitError, match="does not fit the model") as info:
        load_artifact(path, model=SmallResNet(widths=[8, 16], blocks=1))
    assert "\n" not in str(info.value)
    with pytest.raises(PrunekitError, match="does not fit the model"):
        load_artifact(path, model=SmallResNet(widths=[4, 8], blocks=2))
    with pytest.raises(PrunekitError, match="does not fit the model"):
        load_artifact(path, model=torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_misfit_names_the_missing_and_unexpected_keys(saved):
    path, _, _, _ = saved
    with pytest.raises(PrunekitError) as info:
        load_artifact(path, model=SmallResNet(widths=[4, 8], blocks=2))
    message = str(info.value)
    assert "\n" not in message and "does not fit the model: Error(s) in loading state_dict" in message
    assert "Missing key(s) in state_dict: " in message and '"layers.2.conv1.weight"' in message
    with pytest.raises(PrunekitError) as info:
        load_artifact(path, model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    message = str(info.value)
    assert "\n" not in message and 'Missing key(s) in state_dict: "0.weight", "0.bias"' in message
    assert 'Unexpected key(s) in state_dict: "' in message and message.endswith("...")  # long: shortened
    with pytest.raises(PrunekitError) as info:
        load_artifact(path, model=SmallResNet(widths=[8, 16], blocks=1))
    assert "\n" not in str(info.value) and "size mismatch for stem.0.weight" in str(info.value)


def test_artifact_without_architecture_needs_a_model(tmp_path):
    model, _ = pruned_model()
    path = tmp_path / "anon.safetensors"
    save_artifact(path, model)
    with pytest.raises(PrunekitError, match="pass the model"):
        load_artifact(path)
    loaded, _ = load_artifact(path, model=SmallResNet(**ARGS))
    assert get_masks(loaded).keys() == get_masks(model).keys()


# ------------------------------------------------------------------------------------------ atomic write


def _boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("where", ["prunekit.artifact.save", "os.replace"])
def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch, where):
    model, sparsifier = pruned_model()
    new = tmp_path / "new.safetensors"
    old = tmp_path / "old.safetensors"
    save_artifact(old, model, model_info=INFO, specs=sparsifier.layer_specs())
    before = old.read_bytes()

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(artifact_module if module == "prunekit.artifact" else os, name, _boom)
    for path in (new, old):
        with pytest.raises(OSError, match="simulated"):
            save_artifact(path, SmallResNet(**ARGS), model_info=INFO)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]  # no temp file left over
    assert old.read_bytes() == before
    load_artifact(old)


# ----------------------------------------------------------------------------------------------- no pickle


def test_file_is_plain_safetensors(saved):
    path, model, _, _ = saved
    raw = path.read_bytes()
    n = header_length(raw)
    header = json.loads(raw[8 : 8 + n])
    assert raw[8:9] == b"{"
    tensor_bytes = sum(
        v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"
    )
    assert 8 + n + tensor_bytes == len(raw)
    assert not raw.startswith(b"\x80")  # a pickle protocol 2+ stream starts with PROTO (0x80)
    with safe_open(str(path), framework="pt") as handle:
        assert "prunekit" in handle.metadata()
        keys = set(handle.keys())
    assert {k for k in keys if k.startswith("__mask__.")} == {f"__mask__.{n}" for n in get_masks(model)}


def test_loading_never_unpickles(saved, monkeypatch):
    path, _, _, _ = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    load_artifact(path)
    inspect_artifact(path)


def test_artifact_source_does_not_use_pickle():
    tree = ast.parse(Path(artifact_module.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names)
        if isinstance(node, ast.Attribute) and node.attr == "load":
            assert not (isinstance(node.value, ast.Name) and node.value.id in ("torch", "pickle"))
        if isinstance(node, ast.Name):
            assert node.id != "pickle"


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_rows_add_up_to_the_model(saved):
    path, model, sparsifier, size = saved
    rows, totals = inspect_artifact(path)
    effective = effective_parameters(model)
    assert [r["tensor"] for r in rows] == sorted(effective)  # parameters only: no BatchNorm buffers
    specs = sparsifier.layer_specs()
    for row in rows:
        value = effective[row["tensor"]]
        assert row["shape"] == list(value.shape)
        assert row["params"] == value.numel()
        assert row["nonzero"] == int(torch.count_nonzero(value))
        assert row["sparsity"] == pytest.approx(1 - row["nonzero"] / row["params"])
        layer, kind = row["tensor"].rsplit(".", 1)
        if kind == "weight" and layer in specs:
            assert row["pattern"] == str(specs[layer]) != "dense"
        else:
            assert row["pattern"] == "dense"
    counts = count_params(model)
    assert totals["params"] == counts["params"] == sum(r["params"] for r in rows)
    assert totals["nonzero"] == counts["nonzero_params"] == sum(r["nonzero"] for r in rows)
    assert totals["sparsity"] == pytest.approx(counts["sparsity"])
    assert totals["size_bytes"] == size == path.stat().st_size
    assert any(r["pattern"] != "dense" for r in rows)


def test_inspect_checks_the_file_too(saved, tmp_path):
    path, _, _, _ = saved
    raw = path.read_bytes()
    bad = corrupt(path, tmp_path / "bad.safetensors", len(raw) - 1)
    with pytest.raises(PrunekitError, match="SHA-256"):
        inspect_artifact(bad)
