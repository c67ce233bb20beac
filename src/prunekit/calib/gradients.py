"""Gradient passes on calibration data that leave the model as they found it.

Taylor-style importance (unstructured ``taylor`` / ``obd`` criteria, structured ``taylor``) runs backward
passes on calibration batches. :func:`gradients_of` is the one place that makes those passes safe for a
user's training state: the model runs in eval mode (BatchNorm statistics and dropout unchanged) and every
parameter's ``.grad`` (gradients the user had accumulated) is put back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn


@contextmanager
def gradients_of(
    model: nn.Module, params: Mapping[str, nn.Parameter] | None = None
) -> Iterator[dict[str, nn.Parameter]]:
    """Run the block in eval mode; restore the train/eval mode and the ``.grad`` of ``params`` (default:
    every parameter of ``model``) on the way out. Yields the parameters by name."""
    chosen = dict(model.named_parameters() if params is None else params.items())
    saved = {name: p.grad for name, p in chosen.items()}
    was_training = model.training
    model.eval()
    try:
        yield chosen
    finally:
        for name, p in chosen.items():
            p.grad = saved[name]
        model.train(was_training)
