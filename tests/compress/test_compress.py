"""Compressed artifact format: every encoding round-trips bit-exactly for every value dtype, the writer
picks the smallest encoding, damaged files are refused, and sizes are accounted exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fixtures.cli import call_main
from prunekit.cli.commands import app
from prunekit.compress import ArtifactCorrupted, load_compressed, read_header, save_compressed
from prunekit.compress.encodings import (
    ENCODINGS,
    candidates,
    decode,
    encode_bitmask,
    encode_nm,
    narrowest_uint,
    nm_fits,
    smallest,
)
from prunekit.compress.inspect import inspect_compressed
from prunekit.errors import PrunekitError
from prunekit.quant.rounding import dequantize, quantize_int8
from prunekit.select import nm_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _sparse(shape, sparsity: float, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        t = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    else:
        t = torch.randn(shape, generator=g).to(dtype)
    return torch.where(torch.rand(shape, generator=g) < sparsity, torch.zeros((), dtype=dtype), t)


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    sparsity=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 99),
)
def test_every_encoding_round_trips_bit_exact(shape, sparsity, dtype, seed):
    t = _sparse(shape, sparsity, dtype, seed)
    for enc in candidates(t):
        out = decode(enc, tuple(t.shape), t.dtype)
        assert out.dtype == t.dtype and out.shape == t.shape
        assert torch.equal(_bits(out), _bits(t)), enc.encoding


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 6),
    groups=st.integers(1, 4),
    kernel=st.sampled_from([(), (1,), (3, 3)]),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (2, 8)]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 99),
)
def test_nm_round_trips_and_groups_run_along_inputs(out, groups, kernel, nm, dtype, seed):
    n, m = nm
    shape = (out, groups * m, *kernel)
    t = _sparse(shape, 0.0, dtype, seed)
    t = torch.where(nm_mask(t.float().abs() + 1, n, m), t, torch.zeros((), dtype=dtype))
    assert nm_fits(t, n, m)
    enc = encode_nm(t, n, m)
    assert torch.equal(_bits(decode(enc, shape, dtype)), _bits(t))
    kept = t.numel() // m * n
    assert enc.parts["values"].numel() == kept
    assert enc.index_bytes == math.ceil(kept * max(1, math.ceil(math.log2(m))) / 8)  # 2 bits per slot at 2:4


def test_nm_refuses_a_tensor_that_is_not_nm():
    t = torch.ones(4, 8)
    assert not nm_fits(t, 2, 4)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        encode_nm(t, 2, 4)
    assert not nm_fits(torch.ones(4, 6), 2, 4)  # inputs not a multiple of M


def test_sizes_are_exact_and_the_smallest_wins():
    t = _sparse((64, 200), 0.9, torch.float32, 0)
    nnz = int((t != 0).sum())
    sizes = {e.encoding: e for e in candidates(t)}
    assert sizes["dense"].total_bytes == t.numel() * 4
    assert sizes["bitmask"].value_bytes == nnz * 4 and sizes["bitmask"].index_bytes == math.ceil(
        t.numel() / 8
    )
    # CSR: uint8 columns (200 < 256), row pointers up to nnz in uint16
    assert sizes["csr"].index_bytes == nnz * 1 + 65 * 2
    assert smallest(t).total_bytes == min(e.total_bytes for e in sizes.values())
    assert smallest(torch.randn(8, 8)).encoding == "dense"  # nothing to gain: dense (ties go to the simplest)
    assert smallest(t, allowed=("dense",)).encoding == "dense"


def test_narrowest_uint():
    assert narrowest_uint(255) == torch.uint8 and narrowest_uint(256) == torch.uint16
    assert narrowest_uint(65535) == torch.uint16 and narrowest_uint(65536) == torch.uint32
    assert narrowest_uint(2**32) == torch.int64


def test_negative_zero_is_zero():
    t = torch.tensor([[-0.0, 1.0, 0.0, -2.0]])
    enc = encode_bitmask(t)
    assert enc.parts["values"].tolist() == [1.0, -2.0]
    assert torch.equal(decode(enc, (1, 4), t.dtype), t)  # equal in value; the sign of zero is not kept


def test_int8_quantization_keeps_zeros_and_is_per_row():
    w = _sparse((16, 40), 0.7, torch.float32, 3)
    w[5] = 0.0
    q, scale = quantize_int8(w)
    assert torch.equal(q == 0, (w == 0) | (q == 0)) and bool((q[w == 0] == 0).all())
    assert scale[5] == 1.0 and int(q.abs().max()) == 127
    err = (dequantize(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # at most half a step per row


def _state():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 16, 3, 3, generator=g)
    conv = conv * nm_mask(conv.abs(), 2, 4)
    lin = torch.randn(32, 300, generator=g)
    lin[torch.rand(lin.shape, generator=g) < 0.9] = 0
    return {
        "conv.weight": conv,
        "fc.weight": lin,
        "fc.bias": torch.randn(32, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("value_dtype", ["keep", "float32", "float16", "bfloat16", "int8"])
def test_file_round_trip(tmp_path, value_dtype):
    state = _state()
    path = save_compressed(
        state, tmp_path / "m.safetensors", value_dtype, specs={"conv.weight": {"type": "nm", "n": 2, "m": 4}}
    )
    header = read_header(path)
    assert header["format"] == "prunekit.compressed" and header["format_version"] == 3
    raw = load_compressed(path, dequantize_int8=False)
    out = load_compressed(path)
    assert set(out) == set(state)
    assert torch.equal(out["bn.num_batches_tracked"], state["bn.num_batches_tracked"])
    assert out["empty"].shape == (0, 4)
    for name in ("conv.weight", "fc.weight"):
        assert torch.equal(out[name] == 0, (state[name] == 0) | (out[name] == 0))  # zeros stay zero
        if value_dtype in ("keep", "float32"):
            assert torch.equal(out[name], state[name])
        elif value_dtype == "int8":
            assert raw[name].dtype == torch.int8 and f"{name}::scale" in raw
            q, scale = quantize_int8(state[name])
            assert torch.equal(raw[name], q) and torch.equal(raw[f"{name}::scale"], scale)
        else:
            assert torch.equal(raw[name], state[name].to(getattr(torch, value_dtype)))
    assert header["tensors"]["fc.bias"]["dtype"] == (
        "float32" if value_dtype in ("keep", "int8", "float32") else value_dtype
    )
    assert header["tensors"]["conv.weight"]["spec"] == {"type": "nm", "n": 2, "m": 4}


def test_corruption_and_truncation_are_refused(tmp_path):
    path = save_compressed(_state(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "t.safetensors"
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        truncated.write_bytes(data[:cut])
        with pytest.raises(PrunekitError):
            load_compressed(truncated)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # inside the last tensor's bytes
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactCorrupted, match="SHA-256|cannot be decoded"):
        load_compressed(bad)


def test_bad_arguments_and_foreign_files(tmp_path):
    with pytest.raises(PrunekitError, match="value dtype 'int4' is not one of"):
        save_compressed(_state(), tmp_path / "x.safetensors", "int4")
    with pytest.raises(PrunekitError, match="encodings must include 'dense'"):
        save_compressed(_state(), tmp_path / "x.safetensors", encodings=("csr",))
    with pytest.raises(PrunekitError, match="reserves"):
        save_compressed({"a::b": torch.ones(1)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()  # nothing half-written
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PrunekitError, match="not a prunekit compressed artifact"):
        load_compressed(tmp_path / "plain.safetensors")
    with pytest.raises(PrunekitError, match="no such file"):
        load_compressed(tmp_path / "missing.safetensors")


def test_inspect_accounts_every_byte(tmp_path):
    path = save_compressed(_state(), tmp_path / "m.safetensors", "int8")
    rows, totals = inspect_compressed(path)
    by_name = {r["tensor"]: r for r in rows}
    fc = by_name["fc.weight"]
    assert fc["encoding"] in ENCODINGS and fc["dtype"] == "int8" and fc["scale_bytes"] == 32 * 4
    assert fc["bytes"] == fc["value_bytes"] + fc["index_bytes"] + fc["scale_bytes"]
    assert totals["payload_bytes"] + totals["file_overhead_bytes"] == path.stat().st_size
    assert totals["dense_bytes"] == sum(t.numel() * t.element_size() for t in _state().values())


def test_cli_compress_and_inspect(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "plain.safetensors"
    save_file(_state(), str(src))
    out = tmp_path / "c.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["compress", str(src), "--out", str(out), "--dtype", "int8"])
    assert result.exit_code == 0, result.output
    assert "smaller than the tensors stored dense" in result.output
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["total"]["value_dtype"] == "int8"
    code, _, err = call_main(monkeypatch, capsys, "compress", str(src), "--out", str(out), "--dtype", "int3")
    assert code == 2 and "error: value dtype 'int3' is not one of: keep, float32" in err
    code, _, err = call_main(
        monkeypatch, capsys, "compress", str(out), "--out", str(tmp_path / "again.safetensors")
    )
    assert code == 2 and "already compressed" in err
