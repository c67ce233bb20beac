"""Invariants of the sparsity specs: parsing, validation, round-trips, hashing, shape checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import PrunekitError
from prunekit.spec import NM, Block, Unstructured, check_sparsity, from_dict, parse

sparsities = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
nm_pairs = st.integers(min_value=2, max_value=64).flatmap(
    lambda m: st.tuples(st.integers(min_value=1, max_value=m - 1), st.just(m))
)
block_shapes = st.tuples(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=64))
specs = st.one_of(
    sparsities.map(Unstructured),
    nm_pairs.map(lambda nm: NM(*nm)),
    st.builds(Block, block_shapes, sparsities),
)


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2:4", NM(2, 4)),
        (" 1 : 8 ", NM(1, 8)),
        ("0.7", Unstructured(0.7)),
        ("70%", Unstructured(0.7)),
        (0.7, Unstructured(0.7)),
        (0, Unstructured(0.0)),
        ("0", Unstructured(0.0)),
        ("block:4x4@0.5", Block((4, 4), 0.5)),
        ("block:4x4@50%", Block((4, 4), 0.5)),
        ("BLOCK 8x2:0.25", Block((8, 2), 0.25)),
        ({"type": "nm", "n": 2, "m": 4}, NM(2, 4)),
    ],
)
def test_parse_examples(text, expected):
    spec = parse(text)
    assert spec == expected
    assert type(spec) is type(expected)


def test_parse_returns_spec_objects_unchanged():
    for spec in (NM(2, 4), Unstructured(0.5), Block((2, 2), 0.5)):
        assert parse(spec) is spec


def test_parse_percent_and_fraction_agree():
    for pct in range(100):
        assert parse(f"{pct}%") == Unstructured(pct / 100)


@settings(max_examples=60, deadline=None)
@given(nm_pairs)
def test_parse_nm_text(nm):
    n, m = nm
    assert parse(f"{n}:{m}") == NM(n, m)
    assert str(NM(n, m)) == f"{n}:{m}"
    assert parse(str(NM(n, m))) == NM(n, m)


@settings(max_examples=60, deadline=None)
@given(sparsities)
def test_parse_float_text_roundtrip(s):
    assert parse(repr(s)) == Unstructured(s)
    assert parse(s) == Unstructured(s)


# ------------------------------------------------------------------------------- round trips, hashing


@settings(max_examples=60, deadline=None)
@given(specs)
def test_dict_roundtrip(spec):
    data = spec.to_dict()
    assert data["type"] in ("unstructured", "nm", "block")
    back = from_dict(data)
    assert back == spec
    assert type(back) is type(spec)
    assert hash(back) == hash(spec)
    assert parse(data) == spec
    assert back.to_dict() == data
    # to_dict gives plain JSON types
    assert all(isinstance(v, (str, int, float, list)) for v in data.values())


def test_from_dict_does_not_mutate_input():
    data = {"type": "nm", "n": 2, "m": 4}
    from_dict(data)
    assert data == {"type": "nm", "n": 2, "m": 4}


@settings(max_examples=60, deadline=None)
@given(specs)
def test_specs_are_frozen_and_hashable(spec):
    field = dataclasses.fields(spec)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, field, getattr(spec, field))
    assert {spec: 1}[from_dict(spec.to_dict())] == 1
    assert len({spec, from_dict(spec.to_dict())}) == 1


def test_equal_specs_from_different_inputs_hash_equal():
    assert hash(parse("70%")) == hash(Unstructured(0.7)) == hash(parse(0.7))
    assert hash(Block([4, 4], 0.5)) == hash(Block((4, 4), 0.5))
    assert Block([4, 4], 0.5).shape == (4, 4)
    assert len({NM(2, 4), parse("2:4"), from_dict({"type": "nm", "n": 2, "m": 4})}) == 1


def test_unstructured_sparsity_is_float():
    assert isinstance(Unstructured(0).sparsity, float)
    assert isinstance(Block((1, 1), 0).sparsity, float)


@settings(max_examples=60, deadline=None)
@given(nm_pairs)
def test_nm_sparsity(nm):
    n, m = nm
    assert NM(n, m).sparsity == pytest.approx(1 - n / m)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "value", [-0.1, 1.0, 1, 1.5, -1e-12, math.nan, math.inf, -math.inf, True, False, "0.5", None, [0.5]]
)
def test_bad_unstructured_sparsity_names_the_field(value):
    with pytest.raises(PrunekitError, match="sparsity"):
        Unstructured(value)


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=True).filter(lambda x: not 0.0 <= x < 1.0))
def test_any_sparsity_outside_range_is_rejected(value):
    with pytest.raises(PrunekitError, match="sparsity"):
        check_sparsity(value)
    with pytest.raises(PrunekitError, match="sparsity"):
        parse(value)
    with pytest.raises(PrunekitError, match="sparsity"):
        Block((2, 2), value)


def test_check_sparsity_names_the_given_field():
    with pytest.raises(PrunekitError, match="my_field"):
        check_sparsity(2.0, "my_field")


@pytest.mark.parametrize(
    "text", ["abc", "", "  ", "0.7x", "1.2", "100%", "-5%", "nan", "inf", "70%%", "0.5.5"]
)
def test_bad_sparsity_strings(text):
    with pytest.raises(PrunekitError, match="sparsity"):
        parse(text)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((4, 4), "N < M"),
        ((5, 4), "N < M"),
        ((0, 4), "n must"),
        ((-1, 4), "n must"),
        ((1, 1), "m must"),
        ((1, 0), "m must"),
        ((2.0, 4), "n must"),
        ((2, 4.0), "m must"),
        (("2", 4), "n must"),
        ((True, 4), "n must"),
        ((2, None), "m must"),
    ],
)
def test_bad_nm_names_the_field(args, field):
    with pytest.raises(PrunekitError, match=field):
        NM(*args)


@pytest.mark.parametrize(
    ("text", "field"), [("4:4", "N < M"), ("5:4", "N < M"), ("0:4", "n must"), ("1:1", "m must")]
)
def test_bad_nm_text(text, field):
    with pytest.raises(PrunekitError, match=field):
        parse(text)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (((4,), 0.5), "block shape"),
        (((4, 4, 4), 0.5), "block shape"),
        (("4x4", 0.5), "block shape"),
        (((0, 4), 0.5), "block rows"),
        (((4, -1), 0.5), "block cols"),
        (((4.0, 4), 0.5), "block rows"),
        (((4, True), 0.5), "block cols"),
        (((4, 4), 1.0), "sparsity"),
        (((4, 4), math.nan), "sparsity"),
        (((4, 4), True), "sparsity"),
    ],
)
def test_bad_block_names_the_field(args, field):
    with pytest.raises(PrunekitError, match=field):
        Block(*args)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("block:4x4@1.5", "block sparsity"),
        ("block:4x4@0.5.5", "block sparsity"),
        ("block:4x4@abc", "block"),
        ("block:4@0.5", "block"),
        ("block:0x4@0.5", "block rows"),
    ],
)
def test_bad_block_text(text, field):
    with pytest.raises(PrunekitError, match=field):
        parse(text)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"type": "nonsense"}, "type"),
        ({"sparsity": 0.5}, "type"),
        ({"type": "nm", "n": 2}, "nm"),
        ({"type": "nm", "n": 2, "m": 4, "extra": 1}, "nm"),
        ({"type": "unstructured", "sparsity": "0.5"}, "sparsity"),
        ({"type": "unstructured", "sparsity": 1.0}, "sparsity"),
        ({"type": "block", "shape": [4], "sparsity": 0.5}, "block shape"),
        ("unstructured", "spec dict"),
        ([("type", "nm")], "spec dict"),
    ],
)
def test_bad_dicts(data, field):
    with pytest.raises(PrunekitError, match=field):
        from_dict(data)


@pytest.mark.parametrize("value", [None, [0.5], object(), True])
def test_parse_rejects_other_types(value):
    with pytest.raises(PrunekitError):
        parse(value)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        parse("2:2")


# ----------------------------------------------------------------------------------------- shape checks


@pytest.mark.parametrize("shape", [(8, 4), (8, 16), (3, 8, 3, 3), (16, 4, 1)])
def test_nm_check_accepts_divisible_inputs(shape):
    NM(2, 4).check(shape, "layer")


@pytest.mark.parametrize("shape", [(8, 6), (8, 2), (8, 6, 3, 3), (4, 3)])
def test_nm_check_names_the_layer(shape):
    with pytest.raises(PrunekitError, match=r"'encoder\.fc1'.*multiple of M=4"):
        NM(2, 4).check(shape, "encoder.fc1")


def test_nm_check_needs_an_input_dimension():
    with pytest.raises(PrunekitError, match="'bias'"):
        NM(2, 4).check((8,), "bias")


@pytest.mark.parametrize(
    ("shape", "block"), [((8, 8), (4, 4)), ((8, 2, 3, 3), (4, 9)), ((8, 2, 3, 3), (2, 6)), ((6, 4), (1, 1))]
)
def test_block_check_accepts_dividing_blocks(shape, block):
    Block(block, 0.5).check(shape, "layer")


@pytest.mark.parametrize(
    ("shape", "block"), [((8, 6), (4, 4)), ((6, 8), (4, 4)), ((8, 2, 3, 3), (4, 4)), ((8, 2, 3, 3), (3, 2))]
)
def test_block_check_rejects_non_dividing_blocks(shape, block):
    with pytest.raises(PrunekitError, match=r"'conv1'.*does not divide"):
        Block(block, 0.5).check(shape, "conv1")


@settings(max_examples=60, deadline=None)
@given(sparsities, st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_unstructured_check_accepts_any_shape(s, shape):
    Unstructured(s).check(tuple(shape), "any")


def test_str_is_human_readable():
    assert str(Unstructured(0.7)) == "unstructured 70%"
    assert str(Block((4, 4), 0.5)) == "block 4x4 50%"


def test_block_along_channels_text_dict_and_check():
    spec = parse("block:1x4@70%:channels")
    assert spec == Block((1, 4), 0.7, "channels") and str(spec) == "block 1x4 70% along channels"
    assert from_dict(spec.to_dict()) == spec and parse("block:1x4@0.7").along == "flat"
    assert "along" not in parse("block:1x4@0.7").to_dict()  # old files keep their exact dicts
    spec.check((8, 16, 3, 3), "conv")
    with pytest.raises(PrunekitError, match=r"input channels \(6\) to be a multiple of 4"):
        spec.check((8, 6, 3, 3), "conv")  # 54 columns: 1x4 does not divide them either way
    with pytest.raises(PrunekitError, match=r"input channels \(2\) to be a multiple of 4"):
        spec.check((8, 2, 2, 2), "conv")  # 8 columns: 1x4 divides them flat, not along the channels
    with pytest.raises(PrunekitError, match="block along must be one of flat, channels"):
        parse("block:1x4@0.7:rows")
