"""Invariants of mask selection: exact counts, top scores kept, deterministic ties, masks only shrink."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit import select
from prunekit.errors import PrunekitError
from prunekit.select import (
    block_scores,
    kth_smallest,
    nm_mask,
    row_mask,
    select_masks,
    unstructured_masks,
)
from prunekit.spec import NM, Block, Unstructured

INF = math.inf
SPECIAL = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    -2.5,
    INF,
    -INF,
    1e-45,
    -1e-45,
    3.4028234663852886e38,
    -3.4028234663852886e38,
]

# Scores mix arbitrary float32 values with a small pool of repeats and special values, so ties are common.
floats32 = st.one_of(
    st.floats(width=32, allow_nan=False),
    st.sampled_from(SPECIAL),
    st.integers(-3, 3).map(float),
)
finite32 = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False), st.integers(-3, 3).map(float)
)
sparsities = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
shapes = st.tuples(st.integers(1, 6), st.integers(1, 12))
FAST = settings(max_examples=30, deadline=None)


@st.composite
def score_tensors(draw, shape=None, elements=floats32):
    shape = draw(shapes) if shape is None else shape
    values = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@st.composite
def layer_sets(draw, elements=floats32):
    count = draw(st.integers(1, 4))
    return {f"layer{i}": draw(score_tensors(elements=elements)) for i in range(count)}


@st.composite
def alive_masks(draw, shape):
    bits = draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(bits, dtype=torch.bool).reshape(shape)


def _plain(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1).tolist()]


def reference_keep(values: list[float], k: int, alive: list[bool] | None = None) -> list[bool]:
    """Prune the k lowest: dead positions first, then by score, ties by position (Python's stable sort)."""
    alive = alive or [True] * len(values)
    order = sorted(range(len(values)), key=lambda i: (alive[i], values[i] if alive[i] else 0.0))
    keep = [True] * len(values)
    for i in order[:k]:
        keep[i] = False
    return keep


def assert_kept_are_top(scores: torch.Tensor, keep: torch.Tensor) -> None:
    kept, pruned = scores[keep], scores[~keep]
    if kept.numel() and pruned.numel():
        assert kept.min() >= pruned.max()


# ------------------------------------------------------------------------------------------ kth_smallest


@FAST
@given(st.lists(floats32, min_size=1, max_size=200), st.data())
def test_kth_smallest_matches_sort(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    value, below = kth_smallest(lambda: [x], k)
    expected = torch.sort(x).values[k - 1]
    assert value == float(expected)
    assert below == int((x < expected).sum())
    assert below < k <= below + int((x == expected).sum())


@FAST
@given(st.lists(score_tensors(elements=floats32), min_size=1, max_size=4), st.data())
def test_kth_smallest_across_sources_and_chunks(tensors, data):
    flat = torch.cat([t.reshape(-1) for t in tensors])
    k = data.draw(st.integers(1, flat.numel()))
    chunk = data.draw(st.integers(1, 9))
    # sources may be tensors or callables; tiny chunks exercise the chunked histogram passes
    sources = [t if i % 2 else (lambda t=t: t) for i, t in enumerate(tensors)]
    with mock.patch.object(select, "_CHUNK", chunk):
        value, below = kth_smallest(lambda: iter(sources), k)
    expected = torch.sort(flat).values[k - 1]
    assert value == float(expected)
    assert below == int((flat < expected).sum())


@pytest.mark.parametrize("seed", range(3))
def test_kth_smallest_large_random(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(300_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (300_000,), generator=gen)
    x[1::4] = x[::4]  # duplicates
    x[::101] = -0.0
    x[1::103] = 0.0
    ordered = torch.sort(x).values
    for k in (1, 2, 12_345, 150_000, 299_999, 300_000):
        value, below = kth_smallest(lambda x=x: [x[:100_000], x[100_000:]], k)
        assert value == float(ordered[k - 1])
        assert below == int((x < ordered[k - 1]).sum())


@pytest.mark.parametrize("chunk", [1, 3, 4, 1 << 22])
def test_kth_smallest_mixes_non_negative_and_signed_chunks(chunk):
    # non-negative chunks take a fast path (raw bits are keys); signed ones go through full keys
    sources = [
        torch.tensor([0.5, 2.0, 0.0, INF, 1.0, 3.0]),
        torch.tensor([-1.0, 4.0, -0.0, -3.0]),
        torch.tensor([1.0, 0.25, 7.0, 0.5]),
    ]
    flat = torch.cat(sources)
    ordered = torch.sort(flat).values
    with mock.patch.object(select, "_CHUNK", chunk):
        for k in range(1, flat.numel() + 1):
            value, below = kth_smallest(lambda: sources, k)
            assert value == float(ordered[k - 1])
            assert below == int((flat < ordered[k - 1]).sum())


def test_kth_smallest_signed_zero_and_infinities():
    tiny = float(torch.tensor(1e-45))  # the smallest float32 subnormal
    x = torch.tensor([0.0, -0.0, -INF, INF, -0.0, tiny, -tiny])
    values = [kth_smallest(lambda: [x], k) for k in range(1, 8)]
    assert values == [(-INF, 0), (-tiny, 1), (0.0, 2), (0.0, 2), (0.0, 2), (tiny, 5), (INF, 6)]
    assert math.copysign(1.0, values[2][0]) == 1.0  # -0.0 and 0.0 are one value


def test_kth_smallest_other_dtypes():
    x = torch.tensor([3.0, -1.0, 2.0, 2.0], dtype=torch.float64)
    assert kth_smallest(lambda: [x], 3) == (2.0, 1)
    assert kth_smallest(lambda: [x.half()], 1) == (-1.0, 0)


def test_kth_smallest_rejects_bad_k_and_nan():
    x = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError):
        kth_smallest(lambda: [x], 0)
    with pytest.raises(ValueError):
        kth_smallest(lambda: [x], 3)
    with pytest.raises(PrunekitError, match="NaN"):
        kth_smallest(lambda: [torch.tensor([1.0, math.nan])], 1)


# ------------------------------------------------------------------------------------ unstructured: layer


@FAST
@given(layer_sets(), sparsities)
def test_layer_group_exact_and_equals_stable_reference(layers, s):
    masks = unstructured_masks(layers, s, group="layer")
    assert list(masks) == list(layers)
    for name, scores in layers.items():
        keep = masks[name]
        assert keep.dtype == torch.bool and keep.shape == scores.shape
        assert int((~keep).sum()) == round(s * scores.numel())
        assert_kept_are_top(scores, keep)
        k = round(s * scores.numel())
        assert _plain(keep) == [float(b) for b in reference_keep(_plain(scores), k)]


@FAST
@given(layer_sets(), st.data())
def test_layer_group_per_layer_sparsity(layers, data):
    per_layer = {name: data.draw(sparsities) for name in layers}
    masks = unstructured_masks(layers, per_layer, group="layer")
    for name, scores in layers.items():
        assert int((~masks[name]).sum()) == round(per_layer[name] * scores.numel())
        assert_kept_are_top(scores, masks[name])


@pytest.mark.parametrize("group", ["layer", "global", "row"])
def test_zero_sparsity_keeps_everything(group):
    layers = {"a": torch.randn(3, 5), "b": torch.zeros(2, 2)}
    for name, keep in unstructured_masks(layers, 0.0, group=group).items():
        assert keep.all() and keep.shape == layers[name].shape


@pytest.mark.parametrize("group", ["layer", "global"])
def test_all_zero_scores_prune_by_position(group):
    layers = {"a": torch.zeros(4, 10), "b": torch.zeros(10)}
    first = unstructured_masks(layers, 0.3, group=group)
    again = unstructured_masks(layers, 0.3, group=group)
    for name in layers:
        assert torch.equal(first[name], again[name])
    if group == "layer":
        assert (~first["a"]).reshape(-1).tolist() == [True] * 12 + [False] * 28
        assert (~first["b"]).tolist() == [True] * 3 + [False] * 7
    else:  # 15 of 50: ties broken by layer order, then flat index
        assert (~first["a"]).reshape(-1).tolist() == [True] * 15 + [False] * 25
        assert first["b"].all()


def test_negative_scores_are_ranked_not_abs():
    scores = {"w": torch.tensor([[-5.0, -1.0, 0.0, 2.0], [-INF, 3.0, -0.0, 1.0]])}
    keep = unstructured_masks(scores, 0.5, group="layer")["w"]
    # pruned: -inf, -5, -1 and the first of the tied zeros (0.0 at flat index 2; -0.0 is the same value)
    assert keep.tolist() == [[False, False, False, True], [False, True, True, True]]


# ----------------------------------------------------------------------------------- unstructured: global


@FAST
@given(layer_sets(), sparsities)
def test_global_group_exact_top_scores(layers, s):
    masks = unstructured_masks(layers, s, group="global")
    total = sum(t.numel() for t in layers.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(s * total)
    flat_scores = torch.cat([t.reshape(-1) for t in layers.values()])
    flat_keep = torch.cat([masks[n].reshape(-1) for n in layers])
    assert_kept_are_top(flat_scores, flat_keep)
    expected = reference_keep(_plain(flat_scores), round(s * total))
    assert flat_keep.tolist() == expected


@FAST
@given(layer_sets(), sparsities)
def test_lazy_scores_match_tensors(layers, s):
    lazy = {name: (lambda t=t: t.clone()) for name, t in layers.items()}
    for group in ("layer", "global", "row"):
        eager = unstructured_masks(layers, s, group=group)
        deferred = unstructured_masks(lazy, s, group=group)
        for name in layers:
            assert torch.equal(eager[name], deferred[name])


def test_global_compares_across_layers():
    layers = {"small": torch.full((10,), 0.1), "large": torch.full((10,), 5.0)}
    masks = unstructured_masks(layers, 0.5, group="global")
    assert not masks["small"].any() and masks["large"].all()


def test_global_rejects_per_layer_sparsity():
    with pytest.raises(PrunekitError, match="global"):
        unstructured_masks({"a": torch.ones(4)}, {"a": 0.5}, group="global")


# -------------------------------------------------------------------------------------- unstructured: row


@FAST
@given(layer_sets(), sparsities)
def test_row_group_exact_per_row(layers, s):
    masks = unstructured_masks(layers, s, group="row")
    for name, scores in layers.items():
        keep = masks[name]
        assert keep.shape == scores.shape
        k = round(s * scores.shape[1])
        for row_scores, row_keep in zip(scores, keep, strict=True):
            assert int((~row_keep).sum()) == k
            assert_kept_are_top(row_scores, row_keep)
            assert row_keep.tolist() == reference_keep(_plain(row_scores), k)


def test_row_mask_conv_weight_rows_are_output_channels():
    scores = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    keep = row_mask(scores, 0.25)
    assert keep.shape == scores.shape
    assert (~keep).reshape(2, -1).sum(1).tolist() == [3, 3]
    assert (~keep).reshape(2, -1)[:, :3].all()


# ------------------------------------------------------------------------------------------- NaN handling


@pytest.mark.parametrize("group", ["layer", "global", "row"])
def test_nan_scores_raise(group):
    scores = {"a": torch.tensor([[1.0, 2.0], [math.nan, 0.0]])}
    with pytest.raises(PrunekitError, match="NaN"):
        unstructured_masks(scores, 0.5, group=group)


@pytest.mark.parametrize("spec", [NM(1, 2), Block((1, 2), 0.5), Unstructured(0.5)])
def test_nan_scores_raise_for_every_spec(spec):
    with pytest.raises(PrunekitError, match="NaN"):
        select_masks({"a": torch.tensor([[1.0, 2.0], [math.nan, 0.0]])}, {"a": spec})


@pytest.mark.parametrize("group", ["layer", "global", "row"])
def test_nan_at_already_pruned_positions_is_ignored(group):
    scores = {"a": torch.tensor([[1.0, math.nan], [3.0, 0.0]])}
    existing = {"a": torch.tensor([[True, False], [True, True]])}
    keep = unstructured_masks(scores, 0.5, group=group, existing=existing)["a"]
    assert keep.tolist() == [[True, False], [True, False]]


def test_unknown_group_raises():
    with pytest.raises(PrunekitError, match="comparison group"):
        unstructured_masks({"a": torch.ones(2, 2)}, 0.5, group="rows")
    with pytest.raises(PrunekitError, match="comparison group"):
        select_masks({"a": torch.ones(2, 2)}, {"a": Unstructured(0.5)}, group="Global")


# ---------------------------------------------------------------------------------------- existing masks


@st.composite
def layers_with_existing(draw):
    layers = draw(layer_sets())
    existing = {name: draw(alive_masks(t.shape)) for name, t in layers.items() if draw(st.booleans())}
    return layers, existing


@FAST
@given(layers_with_existing(), sparsities)
def test_existing_masks_only_shrink_layer(case, s):
    layers, existing = case
    masks = unstructured_masks(layers, s, group="layer", existing=existing)
    for name, scores in layers.items():
        alive = existing.get(name, torch.ones_like(scores, dtype=torch.bool))
        keep = masks[name]
        assert not (keep & ~alive).any()
        k = max(round(s * scores.numel()), int((~alive).sum()))
        assert int((~keep).sum()) == k
        assert_kept_are_top(scores[alive], keep[alive])
        assert (
            keep.tolist()
            == torch.tensor(reference_keep(_plain(scores), k, alive.reshape(-1).tolist()))
            .reshape(scores.shape)
            .tolist()
        )


@FAST
@given(layers_with_existing(), sparsities)
def test_existing_masks_only_shrink_global(case, s):
    layers, existing = case
    masks = unstructured_masks(layers, s, group="global", existing=existing)
    alive = {n: existing.get(n, torch.ones_like(t, dtype=torch.bool)) for n, t in layers.items()}
    for name in layers:
        assert not (masks[name] & ~alive[name]).any()
    total = sum(t.numel() for t in layers.values())
    dead = sum(int((~a).sum()) for a in alive.values())
    k = max(round(s * total), dead)
    assert sum(int((~m).sum()) for m in masks.values()) == k
    flat_scores = torch.cat([t.reshape(-1) for t in layers.values()])
    flat_alive = torch.cat([alive[n].reshape(-1) for n in layers])
    flat_keep = torch.cat([masks[n].reshape(-1) for n in layers])
    assert_kept_are_top(flat_scores[flat_alive], flat_keep[flat_alive])
    assert flat_keep.tolist() == reference_keep(_plain(flat_scores), k, flat_alive.tolist())


@FAST
@given(layers_with_existing(), sparsities)
def test_existing_masks_only_shrink_row(case, s):
    layers, existing = case
    masks = unstructured_masks(layers, s, group="row", existing=existing)
    for name, scores in layers.items():
        alive = existing.get(name, torch.ones_like(scores, dtype=torch.bool))
        keep = masks[name]
        assert not (keep & ~alive).any()
        for row_scores, row_alive, row_keep in zip(scores, alive, keep, strict=True):
            k = max(round(s * row_scores.numel()), int((~row_alive).sum()))
            assert int((~row_keep).sum()) == k
            assert_kept_are_top(row_scores[row_alive], row_keep[row_alive])
            assert row_keep.tolist() == reference_keep(_plain(row_scores), k, row_alive.tolist())


@pytest.mark.parametrize("group", ["layer", "global", "row"])
def test_existing_dead_rank_below_genuine_minus_inf(group):
    scores = {"a": torch.tensor([[-INF, -INF, 1.0, 2.0]])}
    existing = {"a": torch.tensor([[True, True, True, False]])}
    keep = unstructured_masks(scores, 0.5, group=group, existing=existing)["a"]
    assert keep.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("group", ["layer", "global", "row"])
def test_more_already_pruned_than_requested_stays_pruned(group):
    scores = {"a": torch.arange(8.0).reshape(2, 4)}
    existing = {"a": torch.tensor([[False, False, False, True], [True, True, True, True]])}
    keep = unstructured_masks(scores, 0.25, group=group, existing=existing)["a"]
    assert not (keep & ~existing["a"]).any()
    assert keep[0].tolist() == [False, False, False, True]
    if group == "row":
        assert keep[1].tolist() == [False, True, True, True]
    else:  # the quota (2 of 8) is already spent
        assert keep[1].all()


# ------------------------------------------------------------------------------------------------- N:M


@st.composite
def nm_cases(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    out = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([(), (1, 1), (3, 3), (2, 1)]))
    scores = draw(score_tensors(shape=(out, groups * m, *kernel)))
    return scores, n, m


def _groups_along_inputs(x: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in, *kernel) -> rows of m consecutive input channels at each (out, kernel position)."""
    return x.movedim(1, -1).reshape(-1, m)


@FAST
@given(nm_cases())
def test_nm_keeps_exactly_n_top_scores_per_group(case):
    scores, n, m = case
    keep = nm_mask(scores, n, m)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    groups, kept = _groups_along_inputs(scores, m), _groups_along_inputs(keep, m)
    assert (kept.sum(1) == n).all()
    for g_scores, g_keep in zip(groups, kept, strict=True):
        assert_kept_are_top(g_scores, g_keep)
    assert torch.equal(keep, nm_mask(scores, n, m))  # deterministic


def test_nm_linear_example():
    scores = torch.tensor([[4.0, -1.0, 3.0, 0.0, 1.0, 2.0, 7.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]


def test_nm_conv_groups_run_along_input_channels():
    scores = torch.zeros(1, 4, 1, 2)
    scores[0, :, 0, 0] = torch.tensor([1.0, 4.0, 3.0, 2.0])
    scores[0, :, 0, 1] = torch.tensor([4.0, 1.0, 2.0, 3.0])
    keep = nm_mask(scores, 2, 4)
    assert keep[0, :, 0, 0].tolist() == [False, True, True, False]
    assert keep[0, :, 0, 1].tolist() == [True, False, False, True]


def test_nm_ties_still_keep_exactly_n():
    for shape in [(3, 8), (2, 8, 3, 3)]:
        keep = nm_mask(torch.zeros(shape), 2, 4)
        assert (_groups_along_inputs(keep, 4).sum(1) == 2).all()
        assert torch.equal(keep, nm_mask(torch.zeros(shape), 2, 4))


def test_nm_ties_are_broken_by_position_like_every_other_selection():
    """Among equal scores the earlier input is pruned first (as row_mask and the global selection do)."""
    keep = nm_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 2.0, 2.0, 0.0]]), 2, 4)
    assert keep.tolist() == [[False, False, True, True, True, False, True, False]]
    row = row_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 0.5)
    assert torch.equal(keep[:, :4], row)  # one group of 4 at 2:4 == its row at 50%
    for seed in range(20):  # random ties: the kept set is the last n of each group's stable sort
        scores = torch.randint(0, 3, (4, 16), generator=torch.Generator().manual_seed(seed)).float()
        groups = scores.reshape(-1, 4)
        expected = torch.ones_like(groups, dtype=torch.bool)
        for g in range(groups.shape[0]):
            order = sorted(range(4), key=lambda i, g=g: (groups[g, i].item(), i))
            for i in order[:2]:
                expected[g, i] = False
        assert torch.equal(nm_mask(scores, 2, 4).reshape(-1, 4), expected)


@pytest.mark.parametrize("shape", [(4, 6), (4,), (2, 6, 3, 3)])
def test_nm_rejects_non_dividing_inputs(shape):
    with pytest.raises(PrunekitError, match="multiple of 4"):
        nm_mask(torch.ones(shape), 2, 4)


# ---------------------------------------------------------------------------------------------- blocks


@st.composite
def block_layers(draw, block):
    """A Linear-like (rows*r, cols*c) or, for c == 1, a 1x1-conv weight, tiled by ``block``."""
    r, c = block
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    shape = (rows * r, cols, 1, 1) if c == 1 and draw(st.booleans()) else (rows * r, cols * c)
    # small integers: tile sums are exact in float32, and repeats give tied tiles
    return draw(score_tensors(shape=shape, elements=st.integers(-4, 4).map(float)))


block_shapes = st.tuples(st.integers(1, 3), st.integers(1, 3))


@st.composite
def block_cases(draw):
    block = draw(block_shapes)
    return draw(block_layers(block)), block


def _tiles(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    r, c = shape
    flat = x.reshape(x.shape[0], -1)
    return flat.reshape(flat.shape[0] // r, r, flat.shape[1] // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)


@FAST
@given(
    block_shapes.flatmap(lambda b: st.tuples(st.just(b), st.lists(block_layers(b), min_size=1, max_size=3))),
    sparsities,
    st.sampled_from(["layer", "global"]),
)
def test_block_masks_constant_per_tile_and_exact(case, s, group):
    block, tensors = case
    layers = {f"l{i}": t for i, t in enumerate(tensors)}
    masks = select_masks(layers, {n: Block(block, s) for n in layers}, group=group)
    tile_keep, tile_sums = {}, {}
    for name, scores in layers.items():
        keep = masks[name]
        assert keep.shape == scores.shape
        tiles = _tiles(keep, block)
        assert (tiles == tiles[:, :1]).all(), "a tile is either kept or pruned as a whole"
        tile_keep[name] = tiles[:, 0]
        tile_sums[name] = _tiles(scores, block).sum(1)
        assert torch.equal(tile_sums[name], block_scores(scores, block).reshape(-1))
    if group == "layer":
        for name in layers:
            assert int((~tile_keep[name]).sum()) == round(s * tile_keep[name].numel())
            assert_kept_are_top(tile_sums[name], tile_keep[name])
    else:
        all_keep = torch.cat(list(tile_keep.values()))
        assert int((~all_keep).sum()) == round(s * all_keep.numel())
        assert_kept_are_top(torch.cat(list(tile_sums.values())), all_keep)


def test_block_example():
    scores = torch.tensor([[1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
    keep = select_masks({"w": scores}, {"w": Block((2, 2), 0.5)})["w"]
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True]]


@FAST
@given(block_cases(), sparsities, st.data())
def test_block_existing_only_shrinks(case, s, data):
    scores, block = case
    alive = data.draw(alive_masks(scores.shape))
    keep = select_masks({"w": scores}, {"w": Block(block, s)}, existing={"w": alive})["w"]
    assert not (keep & ~alive).any()
    tile_alive = _tiles(alive, block).any(1)
    tile_kept = _tiles(keep, block).any(1)
    n_tiles = tile_alive.numel()
    assert int((~tile_kept).sum()) == max(round(s * n_tiles), int((~tile_alive).sum()))


def test_block_rejects_row_group():
    with pytest.raises(PrunekitError, match="row"):
        select_masks({"w": torch.ones(4, 4)}, {"w": Block((2, 2), 0.5)}, group="row")


# ------------------------------------------------------------------------------------------ mixed specs


@pytest.mark.parametrize("group", ["layer", "global"])
def test_select_masks_mixed_specs(group):
    gen = torch.Generator().manual_seed(0)
    scores = {
        "fc1": torch.randn(16, 32, generator=gen),
        "fc2": torch.randn(8, 16, generator=gen),
        "conv": torch.randn(8, 4, 3, 3, generator=gen),
        "blk": torch.randn(8, 8, generator=gen),
        "fc3": lambda: torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),
    }
    specs = {
        "fc1": NM(2, 4),
        "conv": NM(2, 4),
        "fc2": Unstructured(0.5),
        "fc3": Unstructured(0.5),
        "blk": Block((2, 4), 0.25),
    }
    masks = select_masks(scores, specs, group=group)
    assert set(masks) == set(scores)
    for name in ("fc1", "conv"):
        assert (_groups_along_inputs(masks[name], 4).sum(1) == 2).all()
    fc3 = scores["fc3"]()
    if group == "layer":
        assert int((~masks["fc2"]).sum()) == 64 and int((~masks["fc3"]).sum()) == 16
    else:
        assert int((~masks["fc2"]).sum()) + int((~masks["fc3"]).sum()) == round(0.5 * (128 + 32))
        both = torch.cat([scores["fc2"].reshape(-1), fc3.reshape(-1)])
        assert_kept_are_top(both, torch.cat([masks["fc2"].reshape(-1), masks["fc3"].reshape(-1)]))
    tiles = _tiles(masks["blk"], (2, 4))
    assert (tiles == tiles[:, :1]).all() and int((~tiles[:, 0]).sum()) == 2
    # the same spec value on different layers is one comparison group under "global" only
    assert torch.equal(masks["fc1"], nm_mask(scores["fc1"], 2, 4))


def test_select_masks_row_group_for_unstructured_and_nm():
    scores = {"a": torch.randn(4, 8), "b": torch.randn(4, 8)}
    masks = select_masks(scores, {"a": Unstructured(0.25), "b": NM(1, 4)}, group="row")
    assert ((~masks["a"]).sum(1) == 2).all()
    assert ((~masks["b"]).sum(1) == 6).all()


@FAST
@given(score_tensors(shape=(4, 8), elements=finite32), alive_masks((4, 8)), alive_masks((4, 8)), sparsities)
def test_select_masks_existing_only_shrinks(scores_a, alive_a, alive_b, s):
    scores = {"a": scores_a, "b": scores_a.flip(0), "c": scores_a.t().contiguous()}
    specs = {"a": NM(2, 4), "b": Unstructured(s), "c": Block((2, 2), s)}
    existing = {"a": alive_a, "b": alive_b, "c": alive_a.t()}
    masks = select_masks(scores, specs, existing=existing)
    for name in scores:
        assert not (masks[name] & ~existing[name]).any()
    assert (_groups_along_inputs(masks["a"], 4).sum(1) <= 2).all()
    assert int((~masks["b"]).sum()) == max(round(s * 32), int((~alive_b).sum()))


def test_block_masks_along_channels_keep_or_drop_4_input_channels_at_one_tap():
    """1x4 tiles along the input channels: each (out, kh, kw, 4 consecutive in) is all kept or all pruned,
    exactly ``round(0.75 * tiles)`` tiles are pruned, the strongest tiles stay."""
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    keep = select_masks({"w": w.abs()}, {"w": Block((1, 4), 0.75, "channels")}, "layer")["w"]
    tiles = keep.reshape(6, 2, 4, 3, 3)
    per_tile = tiles.sum(2)
    assert bool(((per_tile == 0) | (per_tile == 4)).all())
    assert int((per_tile == 0).sum()) == round(0.75 * 6 * 2 * 9)
    scores = w.abs().reshape(6, 2, 4, 3, 3).sum(2)
    assert scores[per_tile == 4].min() >= scores[per_tile == 0].max()
