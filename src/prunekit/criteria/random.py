"""Random pruning: the baseline every criterion must beat (e.g. Liu et al., "The Unreasonable
Effectiveness of Random Pruning", ICLR 2022)."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from prunekit.criteria.base import CRITERIA, Criterion


def random_scores(shape: int | torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent uniform [0, 1) float32 scores of ``shape`` (the baseline every criterion must beat; also
    the structured ``random`` importance, one score per unit)."""
    return torch.rand(shape, generator=generator, dtype=torch.float32)


@CRITERIA.register("random")
class Random(Criterion):
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        # one fixed stream per (seed, layer): independent of layer order, reproducible across runs, and
        # the same on every call -- selection reads the scores several times (select.kth_smallest makes
        # two passes, then thresholds) and needs identical values each time. Later rounds re-use the
        # ranking, so iterative random pruning removes nested random subsets.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return random_scores(module.weight.shape, gen)
