"""Block patterns in the one-shot LLM methods: whole r x c tiles removed, ranked by the L2 norm of their
scores (magnitude: |w|; Wanda: |w| * ||x||; SparseGPT: w^2 / [H^-1]_jj summed over the tile), exact tile
counts per layer, per block-row (Wanda) or per SparseGPT column block."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.llm.prune import LLMPruneConfig, prune_llm
from prunekit.methods import magnitude_mask, sparsegpt_prune, wanda_mask
from prunekit.methods.pattern import block_l2_scores
from prunekit.spec import Block, Unstructured

FAST = settings(max_examples=20, deadline=None)


def tiles(keep: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per tile: True if kept whole; asserts no tile is partly kept."""
    r, c = shape
    t = keep.reshape(keep.shape[0] // r, r, keep.shape[1] // c, c)
    whole, none = t.all(dim=(1, 3)), ~t.any(dim=(1, 3))
    assert bool((whole | none).all()), "a tile was partly pruned"
    return whole


def test_block_l2_scores_is_the_sum_of_squares_over_each_tile():
    s = torch.arange(16.0).reshape(4, 4)
    got = block_l2_scores(s, (2, 1))
    want = torch.tensor([[0 + 16, 1 + 25, 4 + 36, 9 + 49], [64 + 144, 81 + 169, 100 + 196, 121 + 225]])
    assert torch.equal(got, want.float())


@FAST
@given(
    r=st.sampled_from([1, 2, 4, 8]),
    c=st.sampled_from([1, 2]),
    br=st.integers(1, 4),
    bc=st.integers(1, 8),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.75]),
    seed=st.integers(0, 50),
)
def test_magnitude_blocks_remove_the_lowest_l2_tiles_per_layer(r, c, br, bc, sparsity, seed):
    w = torch.randn(r * br, c * bc, generator=torch.Generator().manual_seed(seed))
    keep = magnitude_mask(w, Block((r, c), sparsity))
    kept = tiles(keep, (r, c))
    assert int((~kept).sum()) == round(sparsity * kept.numel())
    norms = block_l2_scores(w, (r, c))
    if kept.any() and (~kept).any():
        assert float(norms[kept].min()) >= float(norms[~kept].max())


def test_wanda_blocks_compare_within_each_block_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    sq = torch.rand(32, generator=g) * 4
    keep = wanda_mask(w, sq, Block((8, 1), 0.5))
    kept = tiles(keep, (8, 1))
    assert kept.sum(dim=1).tolist() == [16, 16]  # half of each block-row's tiles
    scores = block_l2_scores(w.abs() * sq.sqrt(), (8, 1))
    for row in range(2):
        assert float(scores[row][kept[row]].min()) >= float(scores[row][~kept[row]].max())


def _layer(seed: int, rows: int = 16, cols: int = 64, tokens: int = 256):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(tokens, 8, generator=g) @ torch.randn(8, cols, generator=g)
    x = signal + 0.3 * torch.randn(tokens, cols, generator=g)
    return torch.randn(rows, cols, generator=g), x


@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_blocks_prune_whole_tiles_per_column_block_and_reconstruct(seed):
    w, x = _layer(seed)
    h = x.T @ x / x.shape[0]
    spec = Block((8, 1), 0.5)
    new, keep = sparsegpt_prune(w, h, spec, blocksize=16)
    kept = tiles(keep, (8, 1))
    for start in range(0, 64, 16):  # exactly half of every column block's tiles
        assert int((~kept[:, start : start + 16]).sum()) == 16
    assert bool((new[~keep] == 0).all())
    # the OBS update beats zeroing the same tiles, and block SparseGPT beats block magnitude
    err = ((new - w) @ x.T).pow(2).sum()
    zeroed = ((w * keep - w) @ x.T).pow(2).sum()
    magnitude = ((w * magnitude_mask(w, spec) - w) @ x.T).pow(2).sum()
    assert err < zeroed and err < magnitude


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_1x1_blocks_are_unstructured_sparsegpt_bit_for_bit(seed):
    """A 1x1 tile is one weight and its saliency w^2 / [H^-1]_jj (Algorithm 1's), so the block path differs
    from the paper's unstructured one only in which tiles it picks: same masks, same weights, same bits."""
    w, x = _layer(seed)
    h = x.T @ x / x.shape[0]
    block_w, block_keep = sparsegpt_prune(w, h, Block((1, 1), 0.5), blocksize=16)
    flat_w, flat_keep = sparsegpt_prune(w, h, Unstructured(0.5), blocksize=16)
    assert torch.equal(block_keep, flat_keep) and torch.equal(block_w, flat_w)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_llm_with_8x1_blocks(method):
    pytest.importorskip("transformers")
    from fixtures.hf import llama

    torch.manual_seed(0)
    model = llama().eval()
    calib = torch.randint(0, 128, (4, 16))
    prune_llm(model, calib, LLMPruneConfig(method, Block((8, 1), 0.5), blocksize=32))
    for block in model.model.layers:
        for module in (block.self_attn.q_proj, block.mlp.down_proj):
            kept = tiles(module.weight != 0, (8, 1))
            assert int((~kept).sum()) == kept.numel() // 2
