"""Format version 2 of the compressed artifact: one SHA-256 covers every byte (the header's fields too),
the index is compact (the header grows with the model's names, not with per-tensor JSON), crafted
files are refused before anything large is allocated, and version 1 files are still read with every
header field checked."""

from __future__ import annotations

import json
import math
import random
import zlib

import pytest
import torch

from fixtures.cli import call_main
from fixtures.compressed_v1 import save_v1
from fixtures.crafted import craft
from prunekit.compress import ArtifactCorrupted, load_compressed, read_header, save_compressed
from prunekit.compress import index as index_module
from prunekit.compress.index import Record, pack_index
from prunekit.compress.inspect import inspect_compressed
from prunekit.errors import PrunekitError
from prunekit.select import nm_mask


def _state():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 16, 3, 3, generator=g)
    conv = conv * nm_mask(conv.abs(), 2, 8)  # 2:8 beats the bitmask (0.75 bits a weight)
    lin = torch.randn(32, 300, generator=g)
    lin[torch.rand(lin.shape, generator=g) < 0.9] = 0
    sparse = torch.zeros(40, 600)
    sparse[::7, ::13] = 1.5  # ~99% zeros: CSR
    return {
        "conv.weight": conv,
        "fc.weight": lin,
        "fc.bias": torch.randn(32, generator=g),
        "sparse.weight": sparse,
        "bn.num_batches_tracked": torch.tensor(7),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(5, 3, generator=g).to(torch.bfloat16),
    }


SPECS = {
    "conv.weight": {"type": "nm", "n": 2, "m": 8},
    "fc.weight": {"type": "unstructured", "sparsity": 0.9},
}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_every_encoding_is_used_and_the_file_is_verified_and_exact(tmp_path):
    path = save_compressed(
        _state(), tmp_path / "m.safetensors", "int8", specs=SPECS, extra={"model": {"n": 1}}
    )
    header = read_header(path)
    encodings = {e["encoding"] for e in header["tensors"].values()}
    assert encodings == {"dense", "bitmask", "csr", "nm"}
    assert header["format_version"] == 3 and header["extra"] == {"model": {"n": 1}}
    assert header["tensors"]["conv.weight"]["spec"] == SPECS["conv.weight"]
    raw = load_compressed(path, dequantize_int8=False)
    v1 = save_v1(_state(), tmp_path / "v1.safetensors", "int8", specs=SPECS)
    old = load_compressed(v1, dequantize_int8=False)
    assert set(raw) == set(old)
    assert all(_bits(raw[k]) == _bits(old[k]) and raw[k].dtype == old[k].dtype for k in raw)  # same tensors
    rows, totals = inspect_compressed(path)
    assert (
        totals["payload_bytes"] + totals["file_overhead_bytes"] == path.stat().st_size and totals["verified"]
    )


def test_version_1_files_are_read_with_the_same_header(tmp_path):
    v1 = save_v1(_state(), tmp_path / "v1.safetensors", "int8", specs=SPECS, extra={"source": "x"})
    v2 = save_compressed(_state(), tmp_path / "v2.safetensors", "int8", specs=SPECS, extra={"source": "x"})
    h1, h2 = read_header(v1), read_header(v2)
    assert h1["format_version"] == 1 and h2["format_version"] == 3
    for h in (h1, h2):
        del h["format_version"], h["library_version"]
        for e in h["tensors"].values():
            e.pop("sha256", None), e.pop("scale_sha256", None)
    assert h1 == h2  # the same description of every tensor, whichever version wrote it
    r1, r2 = load_compressed(v1), load_compressed(v2)
    assert all(torch.equal(r1[k], r2[k]) for k in r1)


def test_the_header_grows_with_names_not_per_tensor_json(tmp_path):
    """1,000 tensors of 16x16 float32 (1 MB of values): the index, header and alignment stay under 2% of
    the file and under 16 bytes a tensor beyond its name's unshared part; version 1 spent ~400 B a tensor."""
    g = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.mlp.linear.weight": torch.randn(16, 16, generator=g) for i in range(1000)}
    path = save_compressed(state, tmp_path / "big.safetensors")
    _, totals = inspect_compressed(path)
    overhead = totals["file_overhead_bytes"]
    assert overhead <= 0.02 * totals["file_bytes"], overhead
    assert overhead / 1000 < 16
    v1 = save_v1(state, tmp_path / "big.v1.safetensors")
    assert inspect_compressed(v1)[1]["file_overhead_bytes"] > 20 * overhead
    assert all(torch.equal(a, b) for a, b in zip(load_compressed(path).values(), state.values()))


def _raw_index(head, records) -> bytes:
    return zlib.decompressobj(zdict=index_module.WRITE_DICTIONARY).decompress(pack_index(head, records))


def test_the_index_dictionary_is_frozen_and_version_2_indexes_still_read(tmp_path):
    """Version 3 files name the preset dictionary by its Adler-32, so its bytes may never change; a version
    2 file (an index deflated without a dictionary) reads the same, and a version 2 file whose index names
    a dictionary is refused in one line (version 2 has none)."""
    assert zlib.adler32(index_module.WRITE_DICTIONARY) == 0x2854B590
    assert 0x2854B590 in index_module.DICTIONARIES
    path = save_compressed(_state(), tmp_path / "d.safetensors", specs=SPECS, extra={"note": "x"})
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    end = start + json.loads(data[8:start])["index"]["data_offsets"][1]
    assert data[start + 1] & 0x20  # FDICT: the stream names its dictionary
    raw = zlib.decompressobj(zdict=index_module.WRITE_DICTIONARY).decompress(data[start:end])
    plain = craft(tmp_path / "v2.safetensors", {}, [], data[end:], index=zlib.compress(raw, 9), version=2)
    expected, old = read_header(path), read_header(plain)
    assert expected["format_version"] == 3 and old["format_version"] == 2
    del expected["format_version"], old["format_version"]
    assert old == expected
    want, loaded = load_compressed(path), load_compressed(plain)
    assert list(loaded) == list(want)
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    mixed = craft(tmp_path / "mixed.safetensors", {}, [], data[end:], index=data[start:end], version=2)
    with pytest.raises(PrunekitError, match="does not use") as info:
        load_compressed(mixed)
    assert "\n" not in str(info.value)


def _flip(path, where: int, bit: int):
    data = bytearray(path.read_bytes())
    data[where] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_every_header_and_index_byte_is_covered(tmp_path):
    """A flip of one (seeded, random) bit of every byte before the payload (the safetensors header, the
    digest, the index) is refused by load_compressed; every fourth byte by the verifying read_header."""
    path = save_compressed(_state(), tmp_path / "m.safetensors", "int8", specs=SPECS, extra={"note": "café"})
    original = path.read_bytes()
    header = json.loads(original[8 : 8 + int.from_bytes(original[:8], "little")])
    start = 8 + int.from_bytes(original[:8], "little")
    index_end = start + header["index"]["data_offsets"][1]
    bad = tmp_path / "bad.safetensors"
    bits = random.Random(0)
    for where in range(index_end):
        bad.write_bytes(original)
        _flip(bad, where, bits.randrange(8))
        for read in (load_compressed, read_header) if where % 4 == 0 else (load_compressed,):
            with pytest.raises(PrunekitError) as info:
                read(bad)
            assert "\n" not in str(info.value)


def test_no_verify_reads_the_header_and_says_so(tmp_path, monkeypatch, capsys):
    path = save_compressed(_state(), tmp_path / "m.safetensors", "int8", specs=SPECS)
    _flip(path, path.stat().st_size - 3, 2)  # inside the payload
    with pytest.raises(ArtifactCorrupted, match="do not match the SHA-256"):
        read_header(path)
    assert read_header(path, verify=False)["tensors"]  # the index itself is intact
    code, out, err = call_main(monkeypatch, capsys, "inspect", str(path))
    assert code == 2 and err.startswith("error: ") and "corrupted" in err and len(err.splitlines()) == 1
    code, out, err = call_main(monkeypatch, capsys, "inspect", str(path), "--no-verify")
    assert code == 0 and out.strip().splitlines()[-1].endswith(
        "NOT verified (--no-verify): damaged data would go unnoticed"
    )


# -- crafted files: a valid digest over contents no writer makes ---------------------------------------------
_craft = craft


HEAD = {"library_version": "0", "value_dtype": "keep", "specs": []}


def _record(**kw) -> Record:
    base = dict(
        name="w",
        encoding="dense",
        dtype="float32",
        source_dtype="float32",
        shape=(2, 2),
        nonzero=4,
        params={},
    )
    return Record(**{**base, "scale": False, "spec": None, **kw})


def test_a_crafted_file_of_the_right_digest_loads(tmp_path):
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    path = _craft(tmp_path / "ok.safetensors", HEAD, [_record()], _bits(values))
    assert torch.equal(load_compressed(path)["w"], values)  # the crafting helper itself is right


@pytest.mark.parametrize(
    "case, match",
    [
        ("payload too long", "describes 16 payload bytes, the file holds 20"),
        ("nonzero wrong", "another non-zero count"),
        ("csr pointers", "row pointers"),
        ("mask bits", "mask's bits"),
        ("bomb", "inflate"),
        ("bad json head", "head does not parse"),
        ("unknown head field", "unknown fields"),
        ("bad spec", "invalid spec"),
        ("nm shape", "does not fit shape"),
        ("unknown dictionary", "deflate dictionary 0x"),
    ],
)
def test_crafted_indexes_are_refused_in_one_line(tmp_path, case, match):
    values = _bits(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    path = tmp_path / "c.safetensors"
    if case == "payload too long":
        _craft(path, HEAD, [_record()], values + b"\0" * 4)
    elif case == "nonzero wrong":
        _craft(path, HEAD, [_record(nonzero=3)], values)  # a dense tensor of 4 non-zeros said to have 3
    elif case == "csr pointers":
        # 2 rows, 2 non-zeros: indptr [0, 2, 1] decreases
        record = _record(encoding="csr", nonzero=2, shape=(2, 2))
        payload = bytes([0, 2, 1]) + bytes([0, 1]) + _bits(torch.tensor([1.0, 2.0]))
        _craft(path, HEAD, [record], payload)
    elif case == "mask bits":
        record = _record(encoding="bitmask", nonzero=2)
        _craft(path, HEAD, [record], bytes([0b0111]) + _bits(torch.tensor([1.0, 2.0])))
    elif case == "bomb":
        _craft(path, HEAD, [_record()], values, index=zlib.compress(b"\0" * 50_000_000, 9))
    elif case == "bad json head":
        raw = bytearray(b"\x05{nope")
        _craft(path, HEAD, [], b"", index=zlib.compress(bytes(raw) + b"\0"))
    elif case == "unknown head field":
        _craft(path, {**HEAD, "exec": "rm -rf /"}, [_record()], values)
    elif case == "bad spec":
        _craft(
            path, {**HEAD, "specs": [{"type": "unstructured", "sparsity": 4.9}]}, [_record(spec=0)], values
        )
    elif case == "nm shape":
        record = _record(encoding="nm", params={"n": 2, "m": 4}, shape=(2, 2), nonzero=2)
        _craft(path, HEAD, [record], bytes(1) + _bits(torch.tensor([1.0, 2.0])))
    elif case == "unknown dictionary":
        deflater = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS, 9, zdict=b"a dictionary of the future")
        index = deflater.compress(_raw_index(HEAD, [_record()])) + deflater.flush()
        _craft(path, HEAD, [_record()], values, index=index)
    with pytest.raises(PrunekitError, match=match) as info:
        load_compressed(path)
    assert "\n" not in str(info.value)


def test_a_crafted_huge_tensor_is_refused_before_allocation(tmp_path, monkeypatch):
    """A CSR record of shape [1, 10**12] with no non-zeros takes 2 bytes on disk and would decode to 4 TB:
    refused by the memory limit, naming it and how to raise it."""
    record = _record(encoding="csr", shape=(1, 10**12), nonzero=0)
    path = _craft(tmp_path / "huge.safetensors", HEAD, [record], bytes([0, 0]))
    monkeypatch.setenv("PRUNEKIT_MEMORY_LIMIT", "1G")
    with pytest.raises(PrunekitError, match="needs about 5.5 TiB, more than the limit of 1.0 GiB") as info:
        load_compressed(path)
    assert "PRUNEKIT_MEMORY_LIMIT" in str(info.value)
    assert read_header(path)["tensors"]["w"]["shape"] == [1, 10**12]  # the header alone is fine to read


# -- version 1: every field checked against the tensors ------------------------------------------------------
def _edit_v1(path, edit):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    outer = json.loads(data[8 : 8 + n])
    header = json.loads(outer["__metadata__"]["prunekit"])
    edit(header)
    outer["__metadata__"]["prunekit"] = json.dumps(header, sort_keys=True, separators=(",", ":"))
    text = json.dumps(outer, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["tensors"]["fc.weight"].pop("nonzero"), "fields"),
        (
            lambda h: h["tensors"]["fc.weight"].update(nonzero=h["tensors"]["fc.weight"]["nonzero"] + 1),
            "counts",
        ),
        (lambda h: h["tensors"]["fc.weight"]["spec"].update(sparsity=4.9), "sparsity"),
        (lambda h: h["tensors"]["fc.weight"].update(value_bytes=1), "counts"),
        (lambda h: h.update(value_dtype="in!8"), "value_dtype"),
        (lambda h: h["tensors"]["fc.weight"].update(encoding="cs!"), "encoding"),
    ],
)
def test_version_1_header_damage_is_refused(tmp_path, edit, match, monkeypatch, capsys):
    path = save_v1(_state(), tmp_path / "v1.safetensors", "int8", specs=SPECS)
    load_compressed(path)
    _edit_v1(path, edit)
    with pytest.raises(ArtifactCorrupted, match=match):
        load_compressed(path)
    code, _, err = call_main(monkeypatch, capsys, "inspect", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_decoded_sizes_are_what_the_records_say():
    record = _record(encoding="csr", shape=(3, 300), nonzero=5)
    sizes = record.part_bytes()
    assert sizes == {"indptr": 4 * 1, "indices": 5 * 2, "values": 5 * 4}  # uint8 pointers, uint16 columns
    nm = _record(encoding="nm", shape=(4, 8, 3, 3), params={"n": 2, "m": 4}, nonzero=50)
    slots = 4 * 8 * 9 // 4 * 2
    assert nm.part_bytes() == {"slots": math.ceil(slots * 2 / 8), "values": slots * 4}
