"""The ``block`` encoding (R x 1 blocks along the output, the batch-1 block kernels' layout): bit-exact round
trips, its byte count, chosen for block specs when smallest, and LLM directories compressed with their
pattern."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.crafted import craft
from prunekit.compress.container import load_compressed, load_stored, read_header, save_compressed
from prunekit.compress.encodings import decode, encode_block
from prunekit.compress.index import Record
from prunekit.compress.source import read_source
from prunekit.errors import PrunekitError

FAST = settings(max_examples=25, deadline=None)


def blocky(out: int, inn: int, rows: int, sparsity: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    keep = torch.rand(out // rows, inn, generator=g) >= sparsity
    return (w * keep.repeat_interleave(rows, 0)).to(dtype)


@FAST
@given(
    rows=st.sampled_from([1, 4, 8, 16]),
    br=st.integers(1, 5),
    inn=st.integers(1, 300),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int8]),
    seed=st.integers(0, 99),
)
def test_block_round_trips_bit_exactly_and_counts_its_bytes(rows, br, inn, sparsity, dtype, seed):
    t = blocky(rows * br, inn, rows, sparsity, seed, torch.float32)
    t = (t * 10).to(dtype) if dtype == torch.int8 else t.to(dtype)
    enc = encode_block(t, rows)
    assert torch.equal(decode(enc, tuple(t.shape), dtype), t)
    kept = int((t.reshape(br, rows, inn) != 0).any(dim=1).sum())
    index = enc.parts["indices"].element_size()
    assert enc.value_bytes == kept * rows * t.element_size()
    assert enc.index_bytes == kept * index + (br + 1) * enc.parts["indptr"].element_size()


def test_block_refuses_rows_it_does_not_divide():
    with pytest.raises(ValueError, match="multiple"):
        encode_block(torch.ones(6, 4), 4)


def test_block_specs_get_the_block_encoding_when_smallest(tmp_path):
    w = blocky(64, 128, 8, 0.7, seed=1)
    spec = {"type": "block", "shape": [8, 1], "sparsity": 0.7}
    path = save_compressed({"fc.weight": w}, tmp_path / "b.safetensors", "int8", specs={"fc.weight": spec})
    entry = read_header(path)["tensors"]["fc.weight"]
    kept = int((w.reshape(8, 8, 128) != 0).any(dim=1).sum())
    assert entry["encoding"] == "block" and entry["params"] == {"rows": 8, "blocks": kept}
    bitmask = save_compressed({"fc.weight": w}, tmp_path / "m.safetensors", "int8")
    assert read_header(bitmask)["tensors"]["fc.weight"]["encoding"] == "bitmask"
    assert path.stat().st_size < bitmask.stat().st_size
    assert torch.equal(load_compressed(path)["fc.weight"], load_compressed(bitmask)["fc.weight"])
    stored = load_stored(path)["fc.weight"]
    assert (
        stored.encoded.encoding == "block" and stored.scale is not None and stored.tensor.dtype == torch.int8
    )


def test_an_llm_directory_carries_its_pattern_to_the_pruned_layers(tmp_path):
    from safetensors.torch import save_file

    state = {
        "model.layers.0.mlp.up_proj.weight": blocky(16, 8, 8, 0.5, 0),
        "model.norm.weight": torch.ones(8),
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    pattern = {"type": "block", "shape": [8, 1], "sparsity": 0.5}
    metrics = {"pattern": pattern, "method": "wanda", "layer_sparsity": {"model.layers.0.mlp.up_proj": 0.5}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    tensors, specs, extra = read_source(tmp_path)
    assert set(tensors) == set(state)
    assert specs == {"model.layers.0.mlp.up_proj.weight": pattern}
    assert extra["llm"]["pattern"] == pattern


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_block_files_of_format_v2_round_trip_and_keep_the_stored_arrays(tmp_path):
    w = blocky(32, 40, 8, 0.7, seed=3)
    spec = {"type": "block", "shape": [8, 1], "sparsity": 0.7}
    for dtype in ("keep", "bfloat16", "int8"):
        path = save_compressed({"fc.weight": w}, tmp_path / f"{dtype}.sft", dtype, specs={"fc.weight": spec})
        assert read_header(path)["format_version"] == 3
        stored = load_stored(path)["fc.weight"]
        assert stored.encoded.encoding == "block"
        again = decode(stored.encoded, tuple(w.shape), stored.tensor.dtype)
        assert torch.equal(again, stored.tensor)  # the stored arrays are the tensor, bit for bit
        if dtype == "keep":
            assert torch.equal(load_compressed(path)["fc.weight"], w)


HEAD = {"library_version": "0", "value_dtype": "keep", "specs": []}


def _block_record(**kw) -> Record:
    base = dict(name="w", encoding="block", dtype="float32", source_dtype="float32", shape=(4, 3))
    base.update(nonzero=2, params={"rows": 2, "blocks": 1}, scale=False, spec=None)
    return Record(**{**base, **kw})


@pytest.mark.parametrize(
    "case, match",
    [
        ("pointers", "row pointers"),
        ("column", "cannot be decoded"),
        ("shape", "do not fit shape"),
        ("blocks", "blocks of 2"),
    ],
)
def test_crafted_block_records_are_refused_in_one_line(tmp_path, case, match):
    values = _bits(torch.tensor([1.0, 2.0]))
    path = tmp_path / "c.safetensors"
    if case == "pointers":  # 2 block-rows, 1 block: indptr [0, 1, 0] decreases
        craft(path, HEAD, [_block_record()], bytes([0, 1, 0]) + bytes([2]) + values)
    elif case == "column":  # column 7 of 3
        craft(path, HEAD, [_block_record()], bytes([0, 1, 1]) + bytes([7]) + values)
    elif case == "shape":  # 3 x 1 blocks on 4 rows
        craft(path, HEAD, [_block_record(params={"rows": 3, "blocks": 1})], b"")
    elif case == "blocks":  # 2 blocks of 2 hold at most 4 non-zeros, not 5
        craft(path, HEAD, [_block_record(nonzero=5, params={"rows": 2, "blocks": 2})], b"")
    good = craft(tmp_path / "ok.safetensors", HEAD, [_block_record()], bytes([0, 1, 1]) + bytes([2]) + values)
    assert torch.equal(
        load_compressed(good)["w"], torch.tensor([[0, 0, 1.0], [0, 0, 2.0], [0, 0, 0], [0, 0, 0]])
    )
    for reader in (load_compressed, load_stored):
        with pytest.raises(PrunekitError, match=match) as info:
            reader(path)
        assert "\n" not in str(info.value)


def test_load_stored_reads_version_1_files_with_their_encodings(tmp_path):
    from fixtures.compressed_v1 import save_v1

    w = blocky(32, 40, 8, 0.7, seed=4)
    path = save_v1({"fc.weight": w, "fc.bias": torch.ones(32)}, tmp_path / "v1.safetensors", "int8")
    header = read_header(path)
    plain = load_compressed(path, dequantize_int8=False)
    stored = load_stored(path)
    for name, entry in stored.items():
        assert entry.encoded.encoding == header["tensors"][name]["encoding"]
        assert torch.equal(entry.tensor, plain[name])
    assert torch.equal(stored["fc.weight"].scale, plain["fc.weight::scale"])
