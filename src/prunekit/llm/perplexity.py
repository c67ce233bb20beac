"""Perplexity over fixed-length, non-overlapping windows: exp of the mean next-token negative
log-likelihood over every predicted token (each window predicts its tokens 2..L from the ones before)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, progress: Callable[[int, int], None] | None = None
) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for row in range(windows.shape[0]):
            ids = windows[row : row + 1]
            logits = model(ids, use_cache=False).logits[0, :-1].to(torch.float32)
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
            if progress:
                progress(row + 1, windows.shape[0])
    finally:
        model.train(was_training)
    return math.exp(total / count)
