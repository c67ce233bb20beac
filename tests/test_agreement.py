"""prediction_agreement counts the inputs on which two classifiers pick the same class."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit.analysis import prediction_agreement


def test_agreement_counts_and_the_largest_difference():
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    reference = nn.Linear(4, 3)
    flipped = nn.Linear(4, 3)
    flipped.load_state_dict(reference.state_dict())
    loader = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=4)
    same = prediction_agreement(reference, flipped, loader)
    assert same == {"same_predictions": 10, "samples": 10, "max_abs_diff": 0.0}
    with torch.no_grad():
        flipped.bias += torch.tensor([0.0, 0.0, 100.0])  # class 2 wins everywhere now
    expected = int((reference(x).argmax(1) == 2).sum())
    out = prediction_agreement(reference, flipped.train(), loader)
    assert out["same_predictions"] == expected < 10 and out["samples"] == 10
    assert abs(out["max_abs_diff"] - 100.0) < 1e-4
    assert flipped.training  # the mode each model came in with is restored
