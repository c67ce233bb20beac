"""Accuracy, per-class recall and the confusion matrix of a classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from prunekit.errors import PrunekitError


def classification_metrics(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """``accuracy`` and ``per_class_recall`` as fractions in [0, 1]; recall is None for absent classes.

    The fractions are exact ratios of counts (not float32 means), so equal counts give equal numbers.
    """
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    for name, values in (("predictions", preds), ("targets", targets)):
        if len(values) and not (int(values.min()) >= 0 and int(values.max()) < num_classes):
            seen = values.unique().tolist()
            raise PrunekitError(f"{name} must be class indices in [0, {num_classes}), got {seen}")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((targets, preds), torch.ones_like(targets), accumulate=True)
    support = confusion.sum(dim=1).tolist()
    recall = [int(confusion[c, c]) / support[c] if support[c] else None for c in range(num_classes)]
    return {
        "accuracy": int(confusion.trace()) / len(targets) if len(targets) else 0.0,
        "per_class_recall": recall,
        "support": support,
        "confusion": confusion.tolist(),
    }


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    preds, targets = [], []
    for inputs, y in loader:
        preds.append(model(inputs).argmax(dim=1))
        targets.append(y)
    model.train(was_training)
    return torch.cat(preds), torch.cat(targets)


def evaluate(model: nn.Module, loader: DataLoader, num_classes: int) -> dict[str, Any]:
    preds, targets = predict(model, loader)
    return classification_metrics(preds, targets, num_classes)


@torch.inference_mode()
def prediction_agreement(reference: nn.Module, candidate: nn.Module, loader: DataLoader) -> dict[str, Any]:
    """How often ``candidate`` predicts the class ``reference`` predicts over ``loader``'s inputs, and the
    largest absolute difference between their outputs (both models are run in eval mode)."""
    states = reference.training, candidate.training
    reference.eval(), candidate.eval()
    same = total = 0
    diff = 0.0
    for inputs, _ in loader:
        a, b = reference(inputs), candidate(inputs)
        same += int((a.argmax(dim=1) == b.argmax(dim=1)).sum())
        total += len(inputs)
        diff = max(diff, float((a - b).abs().max())) if len(inputs) else diff
    reference.train(states[0]), candidate.train(states[1])
    return {"same_predictions": same, "samples": total, "max_abs_diff": diff}
