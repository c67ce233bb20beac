"""Wall-clock latency: warm-up, then many timed single calls; median and tail percentiles."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


@torch.inference_mode()
def measure_latency(
    model: nn.Module, example: torch.Tensor | tuple, warmup: int = 20, runs: int = 200
) -> dict[str, Any]:
    """Time ``runs`` forward passes after ``warmup`` untimed ones; milliseconds."""
    if runs < 1 or warmup < 0:
        raise ValueError("need runs >= 1 and warmup >= 0")
    args = example if isinstance(example, tuple) else (example,)
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(*args)
        times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    times.sort()
    return {
        "p50": statistics.median(times),
        "p99": times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))],
        "mean": statistics.fmean(times),
        "runs": runs,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
    }
