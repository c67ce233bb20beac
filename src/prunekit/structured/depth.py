"""Whole-layer removal ranked by block influence (Men et al., "ShortGPT: Layers in Large Language Models
are More Redundant Than You Expect", 2024): BI_i = 1 - E_t[cos(x_in_t, x_out_t)] over the tokens (or
positions) of calibration inputs; the blocks that change their residual stream least go first.

Works on any model whose repeated blocks sit in an ``nn.ModuleList`` (or ``nn.Sequential``) and map a
hidden state to one of the same shape (transformer decoder/encoder layers, ResNet stages' identity
blocks). Hugging Face configs get ``num_hidden_layers`` and the layers' ``layer_idx`` renumbered, so
the model keeps working with caches and ``save_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.calib.blocks import find_blocks
from prunekit.calib.hooks import Hooks
from prunekit.errors import PrunekitError


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between a block's input and output, per token (last dim = features)."""
    a = x_in.detach().reshape(-1, x_in.shape[-1]).float()
    b = x_out.detach().reshape(-1, x_out.shape[-1]).float()
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return getattr(x, "last_hidden_state", None)


@torch.no_grad()
def influences(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[tuple]) -> torch.Tensor:
    """Mean block influence of each block over calibration batches (each a tuple of model inputs)."""
    scores = torch.zeros(len(blocks))
    counts = torch.zeros(len(blocks))

    def hook_for(i: int):
        def hook(module, args, kwargs, output):
            x_in = _first_tensor(args) if args else _first_tensor(next(iter(kwargs.values()), None))
            x_out = _first_tensor(output)
            if x_in is None or x_out is None or x_in.shape != x_out.shape:
                raise PrunekitError(f"block {i} does not map a hidden state to one of the same shape")
            scores[i] += block_influence(x_in, x_out)
            counts[i] += 1

        return hook

    was_training = model.training
    model.eval()
    try:
        with Hooks() as hooks:
            for i, block in enumerate(blocks):
                hooks._handles.append(block.register_forward_hook(hook_for(i), with_kwargs=True))
            for batch in batches:
                model(*(batch if isinstance(batch, tuple) else (batch,)))
    finally:
        model.train(was_training)
    if bool((counts == 0).any()):
        raise PrunekitError("some blocks never ran on the calibration inputs")
    return scores / counts


def drop_layers(
    model: nn.Module, batches: Sequence[tuple] | tuple | torch.Tensor, count: int, blocks: str | None = None
) -> list[int]:
    """Remove the ``count`` blocks with the lowest influence, in place; returns their original indices."""
    if isinstance(batches, (torch.Tensor, tuple)):
        batches = [batches]
    name, container = find_blocks(
        model,
        blocks,
        kinds=(nn.ModuleList, nn.Sequential),
        min_blocks=2,
        rank="length",
        what="repeated blocks",
    )
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < len(container):
        raise PrunekitError(f"count must be an integer in [0, {len(container)}), got {count!r}")
    scores = influences(model, list(container), batches)
    drop = sorted(torch.argsort(scores, stable=True)[:count].tolist())
    kept = [m for i, m in enumerate(container) if i not in drop]
    new = type(container)(kept) if isinstance(container, nn.ModuleList) else nn.Sequential(*kept)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    for index, block in enumerate(kept):  # caches index layers by position (Hugging Face layer_idx)
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = index
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
    return drop
