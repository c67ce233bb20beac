"""Streaming float32 statistics with ``add_batch / value / reset``.

Running means rather than sums, as the Wanda and SparseGPT reference code keep them, so the value does not
depend on how many batches were seen and float32 does not overflow on long calibration runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class RunningMean:
    """Element-wise running mean of per-batch tensors, weighted by the number of samples in each."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._mean: torch.Tensor | None = None
        self.count = 0

    def add_batch(self, value: torch.Tensor, samples: int = 1) -> None:
        value = value.detach().to(torch.float32)
        if self._mean is None:
            self._mean = torch.zeros_like(value)
        self.count += samples
        self._mean += (value - self._mean) * (samples / self.count)

    def value(self) -> torch.Tensor:
        if self._mean is None:
            raise RuntimeError("no batch was added")
        return self._mean


class RunningGram:
    """Running mean of ``x x^T`` over the rows ``x`` of 2-D batches, in float32 (SparseGPT's Hessian).

    Updated in place with one ``addmm_`` per batch: ``H <- H * n/(n+t) + X^T X / (n+t)``, the reference
    code's running form without its 2/n factor (a common scale that changes no OBS step).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._gram: torch.Tensor | None = None
        self.count = 0

    def add_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add the rows of ``x``; with ``y`` (matching rows), the running mean of ``x y^T`` instead (the
        cross term of a least-squares refit)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        y = x if y is None else y.detach().reshape(-1, y.shape[-1]).to(torch.float32)
        if self._gram is None:
            self._gram = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
        total = self.count + x.shape[0]
        self._gram.mul_(self.count / total).addmm_(x.T, y, alpha=1.0 / total)
        self.count = total

    def value(self) -> torch.Tensor:
        if self._gram is None:
            raise RuntimeError("no batch was added")
        return self._gram


class RunningSqNorm:
    """Running mean of ``x_j^2`` per input feature ``j`` over every sample and position (Wanda's
    ``||X_j||_2^2`` up to a common factor, which changes no ranking).

    Features are the last dimension (Linear inputs, ``(..., features)``), or with ``channels_first`` the
    channels of a conv input ``(N, C, *spatial)``, averaged over batch and space.
    """

    def __init__(self, channels_first: bool = False) -> None:
        self.channels_first = channels_first
        self.mean = RunningMean()

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        if self.channels_first:
            x = x.movedim(1, -1)
        flat = x.reshape(-1, x.shape[-1])
        self.mean.add_batch(flat.pow(2).mean(dim=0), flat.shape[0])

    def value(self) -> torch.Tensor:
        return self.mean.value()


@dataclass(frozen=True)
class InputMoments:
    """Per-feature mean and mean square of a layer's input, and optionally its Gram matrix."""

    mean: torch.Tensor  # (in,) mean of x_j over every token
    sq_mean: torch.Tensor  # (in,) mean of x_j^2 (Wanda's ||X_j||^2 / n)
    gram: torch.Tensor | None = None  # (in, in) mean of x x^T when asked for

    @property
    def variance(self) -> torch.Tensor:
        return (self.sq_mean - self.mean.pow(2)).clamp_min(0.0)


class RunningMoments:
    """Running :class:`InputMoments` of the rows of 2-D batches (features last), in float32: what DSnoT
    needs (mean and variance per input feature) next to what the pruning method needs (``gram`` or not)."""

    def __init__(self, gram: bool = False) -> None:
        self._mean = RunningMean()
        self._sq = RunningMean()
        self._gram = RunningGram() if gram else None

    def add_batch(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self._mean.add_batch(flat.mean(dim=0), flat.shape[0])
        self._sq.add_batch(flat.pow(2).mean(dim=0), flat.shape[0])
        if self._gram is not None:
            self._gram.add_batch(flat)

    def value(self) -> InputMoments:
        gram = self._gram.value() if self._gram is not None else None
        return InputMoments(self._mean.value(), self._sq.value(), gram)
