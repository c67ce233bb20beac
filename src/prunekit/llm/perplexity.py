"""Perplexity over fixed-length, non-overlapping windows: exp of the mean next-token negative
log-likelihood over every predicted token (each window predicts its tokens 2..L from the ones before).

:func:`perplexity` runs a model held in memory; :func:`perplexity_pretrained` streams a safetensors
checkpoint block by block (the same block calls the pruning runner uses, one block in memory at a time) and
gives the same number: the blocks, the final norm and the head run the same operations on the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from prunekit.calib.blocks import find_blocks, logits_from_hidden
from prunekit.calib.sequential import final_hidden, outside_on
from prunekit.llm.checkpoint import Checkpoint
from prunekit.llm.stream import StreamedBlocks, skeleton


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Perplexity of ``model`` (run where it is, or moved to ``device`` for the evaluation and back)."""
    was_training = model.training
    home = next(model.parameters()).device
    model.eval()
    if device is not None:
        model.to(device)
    where = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for row in range(windows.shape[0]):
            ids = windows[row : row + 1].to(where)
            logits = model(ids, use_cache=False).logits[0, :-1].to(torch.float32)
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
            if progress:
                progress(row + 1, windows.shape[0])
    finally:
        model.train(was_training)
        if device is not None:
            model.to(home)
    return math.exp(total / count)


@torch.no_grad()
def perplexity_pretrained(
    directory: str | Path,
    windows: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str = "cpu",
    blocks_path: str | None = None,
) -> float:
    """Perplexity of the checkpoint in ``directory``, streamed: ``progress`` counts blocks (then one step
    for the head)."""
    checkpoint = Checkpoint(directory)
    model = skeleton(directory, checkpoint.dtype())
    path, blocks = find_blocks(model, blocks_path)
    source = StreamedBlocks(model, checkpoint, path, len(blocks))
    device = torch.device(device)
    steps = len(blocks) + 1

    def blocks_done(done: int, total: int) -> None:
        if progress:
            progress(done, steps)

    hidden, returns_tuple = final_hidden(
        model, windows, blocks_path=path, source=source, device=device, progress=blocks_done
    )
    total, count = 0.0, 0
    with source.outside(), outside_on(model, path, device):
        for row in range(windows.shape[0]):
            ids = windows[row : row + 1].to(device)
            last = hidden[row : row + 1].to(device)
            logits = logits_from_hidden(model, blocks, ids, last, returns_tuple)[0, :-1].to(torch.float32)
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    if progress:
        progress(steps, steps)
    return math.exp(total / count)
