"""Resource limits before allocation: sizes parse, the memory limit comes from the environment when set,
an input shape is estimated on the meta device, and text is read up to its limit (not forever)."""

from __future__ import annotations

import pytest
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.limits import check_input, check_memory, forward_bytes, human, parse_size, read_bounded


def test_sizes_parse_and_print():
    assert parse_size("64G", "x") == 64 << 30 and parse_size("512 MiB", "x") == 512 << 20
    assert parse_size("1000", "x") == 1000 and parse_size("1.5K", "x") == 1536
    for bad in ("", "-1", "lots", "0"):
        with pytest.raises(PrunekitError, match="x must be"):
            parse_size(bad, "x")
    assert human(1536) == "1.5 KiB" and human(3 << 40) == "3.0 TiB" and human(12) == "12 B"


def test_the_memory_limit_names_what_asked_and_how_to_raise_it(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_MEMORY_LIMIT", "1M")
    check_memory(1 << 20, "exactly the limit")
    with pytest.raises(PrunekitError) as info:
        check_memory((1 << 20) + 1, "a thing")
    assert str(info.value) == (
        "a thing needs about 1.0 MiB, more than the limit of 1.0 MiB (PRUNEKIT_MEMORY_LIMIT=1M); "
        "set PRUNEKIT_MEMORY_LIMIT (e.g. PRUNEKIT_MEMORY_LIMIT=64G) to allow more"
    )


def test_forward_bytes_is_input_plus_twice_the_largest_activation():
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))
    shape = (2, 1, 8, 8)
    largest = 2 * 16 * 8 * 8 * 4  # the conv's (and ReLU's, Flatten's) output, float32
    assert forward_bytes(model, shape) == 2 * 64 * 4 + 2 * largest
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


def test_input_shapes_are_refused_before_allocation(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_MEMORY_LIMIT", "1G")
    model = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1))
    check_input(model, (1, 1, 64, 64))
    for shape, why in (
        ((1, 1, 100000, 100000), "the input alone"),
        ((99999999999999999999, 1, 8, 8), "the input alone"),
        ((1, 1, 3000, 3000), "input and activations"),  # 36 MB in, 2.3 GB out of the conv
    ):
        with pytest.raises(PrunekitError, match=f"--input-shape {','.join(map(str, shape))} \\({why}"):
            check_input(model, shape)


def test_text_is_read_up_to_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_TEXT_LIMIT", "1K")
    small = tmp_path / "small.txt"
    small.write_text("x" * 1024)
    assert read_bounded(small, "--calib-file") == b"x" * 1024
    with pytest.raises(PrunekitError, match="--calib-file: /dev/zero holds more than 1.0 KiB of text"):
        read_bounded("/dev/zero", "--calib-file")
