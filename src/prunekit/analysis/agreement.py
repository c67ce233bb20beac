"""Prediction agreement of a compressed model with its reference: overall, per class and under small input
perturbations (Gaussian noise, one-pixel shifts), as a regression check of the compression.

Accuracy can hold while the compressed model decides differently on many inputs (errors traded for other
errors); agreement counts those. Per class, inputs are grouped by their *true* label. Under a perturbation
both models see the same perturbed input, so the number says whether they still agree off the clean test
points; ``reference_stable``/``candidate_stable`` say how often each model keeps its own clean prediction,
which tells a fragile reference apart from a fragile compressed model.

Everything is deterministic: the noise comes from a generator seeded per call, and the shifts are exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from prunekit.errors import PrunekitError

DEFAULT_SIGMAS = (0.05, 0.1, 0.25)  # noise std as a fraction of the inputs' std
SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # (dx, dy) in pixels: right, left, down, up


def agreement_counts(
    reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """Agreement of two prediction vectors, overall and per true class.

    ``agreement`` is ``same / samples``; ``per_class`` is the same ratio over the inputs of each true class
    (None for a class with no inputs); ``per_class_same`` and ``support`` are the counts behind it.
    """
    reference, candidate, targets = (t.reshape(-1).long() for t in (reference, candidate, targets))
    if not (len(reference) == len(candidate) == len(targets)):
        raise PrunekitError(
            f"predictions and targets must have the same length, got {len(reference)}, {len(candidate)} "
            f"and {len(targets)}"
        )
    if len(targets) and not (int(targets.min()) >= 0 and int(targets.max()) < num_classes):
        raise PrunekitError(
            f"targets must be class indices in [0, {num_classes}), got {targets.unique().tolist()}"
        )
    same = reference == candidate
    support = torch.bincount(targets, minlength=num_classes).tolist()
    hits = torch.bincount(targets[same], minlength=num_classes).tolist()
    return {
        "agreement": int(same.sum()) / len(same) if len(same) else 0.0,
        "same": int(same.sum()),
        "samples": len(same),
        "per_class": [h / s if s else None for h, s in zip(hits, support)],
        "per_class_same": hits,
        "support": support,
    }


def add_noise(inputs: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``inputs + N(0, sigma^2)`` with noise drawn from ``generator`` (absolute sigma)."""
    noise = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype)
    return inputs + sigma * noise


def shift_image(inputs: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Translate images ``(N, C, H, W)`` by ``dx`` pixels right and ``dy`` down; the strip uncovered at
    the border repeats the edge pixels (no wrap-around, no invented values)."""
    if inputs.dim() != 4:
        raise PrunekitError(f"shifts need image inputs (N, C, H, W), got shape {tuple(inputs.shape)}")
    h, w = inputs.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        raise PrunekitError(f"shift ({dx}, {dy}) is not smaller than the image ({h}x{w})")
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))  # left, right, top, bottom
    padded = F.pad(inputs, pad, mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


@torch.inference_mode()
def _predict(model: nn.Module, batches, transform=None) -> torch.Tensor:
    return torch.cat([model(x if transform is None else transform(x)).argmax(dim=1) for x, _ in batches])


def _input_std(loader: DataLoader) -> float:
    """Standard deviation of every input value over ``loader`` (streamed, float64 sums)."""
    n, total, squares = 0, 0.0, 0.0
    for x, _ in loader:
        x = x.double()
        n, total, squares = n + x.numel(), total + float(x.sum()), squares + float((x * x).sum())
    if n < 2:
        return 0.0
    return max((squares - total * total / n) / (n - 1), 0.0) ** 0.5


def agreement_report(
    reference: nn.Module,
    candidate: nn.Module,
    loader: DataLoader,
    num_classes: int,
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS,
    shifts: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Agreement of ``candidate`` with ``reference`` on ``loader``: clean, with Gaussian noise of each
    ``sigma`` times the inputs' standard deviation, and (for image inputs) shifted by one pixel each way.

    ``loader`` must yield the same batches in the same order on every pass (no shuffling); it is read once
    per variant, so memory stays one batch. Both models run in eval mode and are left in the mode they came
    in. The noise of sigma number ``i`` comes from a generator seeded with ``seed + i``.
    """
    if any(not s > 0 for s in sigmas):
        raise PrunekitError(f"sigmas must be > 0 (fractions of the input std), got {list(sigmas)}")
    first = next(iter(loader), None)
    if first is None:
        raise PrunekitError("agreement needs at least one batch of inputs")
    images = shifts and first[0].dim() == 4
    targets = torch.cat([y for _, y in loader])
    std = _input_std(loader)
    states = reference.training, candidate.training
    reference.eval(), candidate.eval()
    try:
        clean_ref, clean_cand = _predict(reference, loader), _predict(candidate, loader)
        out: dict[str, Any] = {"clean": agreement_counts(clean_ref, clean_cand, targets, num_classes)}
        # each value makes a fresh transform, so both models see the very same perturbed inputs
        variants = {f"noise {s:g} std": _noise(s * std, seed + i) for i, s in enumerate(sigmas)}
        if images:
            variants.update({f"shift dx={dx:+d} dy={dy:+d}": _shift(dx, dy) for dx, dy in SHIFTS})
        out["perturbed"] = {}
        for name, make in variants.items():
            ref, cand = _predict(reference, loader, make()), _predict(candidate, loader, make())
            entry = agreement_counts(ref, cand, targets, num_classes)
            entry["reference_stable"] = int((ref == clean_ref).sum()) / len(ref)
            entry["candidate_stable"] = int((cand == clean_cand).sum()) / len(cand)
            out["perturbed"][name] = entry
    finally:
        reference.train(states[0]), candidate.train(states[1])
    out["input_std"] = std
    out["seed"] = seed
    out["shifts"] = (
        "one pixel each way, edge pixels repeated" if images else "not applied (inputs not images)"
    )
    return out


def _noise(sigma: float, seed: int):
    """A factory of noise transforms; each transform restarts the generator, so it repeats its noise."""

    def make():
        generator = torch.Generator().manual_seed(seed)
        return lambda x: add_noise(x, sigma, generator)

    return make


def _shift(dx: int, dy: int):
    return lambda: lambda x: shift_image(x, dx, dy)
