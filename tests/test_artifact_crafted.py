"""Crafted artifact headers (a valid SHA-256 over contents no writer makes): the model the header asks
for is built on the meta device and compared with the tensors the file holds before anything real is
allocated, so a 737 KB file asking for a 150 GB model is one line, and the peak memory of the refused
load stays within twice the file's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from prunekit.artifact import _digest, load_artifact, save_artifact
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks
from prunekit.models import build_model


def _artifact(path, widths=(4, 8)):
    torch.manual_seed(0)
    args = {"widths": list(widths), "blocks": 1}
    model = build_model("resnet-digits", args)
    apply_masks(model, {"layers.0.conv1": torch.rand(model.layers[0].conv1.weight.shape) > 0.5})
    save_artifact(path, model, model_info={"name": "resnet-digits", "args": args})
    return path


def _craft(path, edit):
    """Rewrite the header with ``edit`` and a correct SHA-256 (what anyone can do to a file)."""
    raw = path.read_bytes()
    tensors = load(raw)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["prunekit"])
    edit(header, tensors)
    header.pop("sha256", None)
    header["sha256"] = _digest(tensors, header)
    path.write_bytes(save(tensors, metadata={"prunekit": json.dumps(header)}))
    return path


def test_a_header_asking_for_a_150_gb_model_is_refused_before_allocation(tmp_path):
    path = _craft(
        _artifact(tmp_path / "a.safetensors"),
        lambda h, t: h["model"]["args"].update(widths=[4096, 8192, 16384]),
    )
    with pytest.raises(PrunekitError) as info:
        load_artifact(path)
    message = str(info.value)
    assert "\n" not in message
    # refused by the memory limit, or (on a machine with that much free) by the shapes it does not hold
    assert "more than the limit" in message or "does not fit the tensors it holds" in message


def test_a_header_whose_model_differs_names_the_tensors(tmp_path):
    path = _craft(
        _artifact(tmp_path / "a.safetensors"), lambda h, t: h["model"]["args"].update(widths=[4, 16])
    )
    with pytest.raises(
        PrunekitError,
        match=r"does not fit the tensors it holds: other shapes: fc\.weight \[10, 8\] \(model: \[10, 16\]\)",
    ):
        load_artifact(path)


def test_a_mask_shape_beyond_its_bits_is_refused(tmp_path):
    path = _craft(
        _artifact(tmp_path / "a.safetensors"),
        lambda h, t: h["masks"].update({"layers.0.conv1": [100000, 100000]}),
    )
    with pytest.raises(PrunekitError, match="malformed prunekit header: mask of shape"):
        load_artifact(path)


def test_bad_model_args_in_a_header_are_one_line(tmp_path):
    for args in ({"widths": [-4]}, {"widths": "many"}, {"nope": 1}):
        path = _craft(_artifact(tmp_path / "a.safetensors"), lambda h, t, a=args: h["model"].update(args=a))
        with pytest.raises(PrunekitError) as info:
            load_artifact(path)
        assert "\n" not in str(info.value)


PEAK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from prunekit.artifact import load_artifact
    from prunekit.errors import PrunekitError

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    load_artifact(sys.argv[1])  # warm up: every import and allocator arena a load uses
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = status("VmRSS")
    try:
        load_artifact(sys.argv[2])
        outcome = "loaded"
    except PrunekitError as exc:
        outcome = str(exc)
    print(json.dumps({"peak_growth": status("VmHWM") - before, "outcome": outcome}))
    """
)


def test_peak_memory_of_a_refused_crafted_load_is_within_twice_the_file(tmp_path):
    """A 47 MB artifact whose header asks for a 150 GB model: the load's peak RSS grows by the file's size
    (1.1x measured) before it is refused; the target is at most twice the file."""
    small = _artifact(tmp_path / "small.safetensors")
    big = _artifact(tmp_path / "big.safetensors", widths=(512, 640))
    _craft(big, lambda h, t: h["model"]["args"].update(widths=[4096, 8192, 16384]))
    size = big.stat().st_size
    assert size > 30e6
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(small), str(big)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] != "loaded"
    # the file was read (once: its tensors are views of its bytes) and nothing else of note; target <= 2x
    assert size / 2 < result["peak_growth"] <= 1.5 * size, (result, size)


@pytest.mark.parametrize(
    "name, args",
    [
        ("os:system", {"command": "touch {marker}"}),
        ("subprocess:run", {"args": ["touch", "{marker}"]}),
        ("pathlib:Path.touch", {"self": "{marker}"}),
    ],
)
def test_a_header_naming_a_function_never_runs_it(tmp_path, name, args):
    """Model names may be ``module:attribute`` references (recipes use them); from a file they resolve only
    to nn.Module classes of modules already imported, so a crafted header cannot run a command."""
    marker = tmp_path / "pwned"
    fill = str(marker)
    filled = {
        k: [a.format(marker=fill) for a in v] if isinstance(v, list) else v.format(marker=fill)
        for k, v in args.items()
    }
    path = _craft(
        _artifact(tmp_path / "a.safetensors"), lambda h, t: h.update(model={"name": name, "args": filled})
    )
    with pytest.raises(PrunekitError, match="not an nn.Module class") as info:
        load_artifact(path)
    assert "\n" not in str(info.value) and not marker.exists()


def test_a_header_naming_a_module_not_imported_does_not_import_it(tmp_path):
    path = _craft(
        _artifact(tmp_path / "a.safetensors"),
        lambda h, t: h.update(
            model={"name": "antigravity:Thing", "args": {}}
        ),  # importing it opens a browser
    )
    with pytest.raises(PrunekitError, match="loading a file never imports code: import antigravity first"):
        load_artifact(path)
    assert "antigravity" not in sys.modules


def test_a_reference_to_an_imported_module_class_loads(tmp_path):
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    path = tmp_path / "linear.safetensors"
    name = "torch.nn.modules.linear:Linear"
    save_artifact(path, linear, model_info={"name": name, "args": {"in_features": 3, "out_features": 2}})
    model, _ = load_artifact(path)
    assert torch.equal(model.weight, linear.weight) and torch.equal(model.bias, linear.bias)
