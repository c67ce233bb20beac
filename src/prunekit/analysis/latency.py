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
    return _stats(times, warmup)


@torch.inference_mode()
def compare_latency(
    models: dict[str, nn.Module],
    example: torch.Tensor | tuple,
    runs: int = 200,
    warmup: int = 20,
    blocks: int = 10,
) -> dict[str, dict[str, Any]]:
    """Latency of several models measured in one run, interleaved so that drift and noise hit all alike.

    Each model gets ``warmup`` untimed calls, then ``blocks`` rounds in which every model (in an order that
    alternates each round) runs ``runs / blocks`` timed calls. Returns ``measure_latency``-style stats per
    model plus ``p50_ratio`` against the first model.
    """
    if runs < 1 or warmup < 0 or blocks < 1:
        raise ValueError("need runs >= 1, warmup >= 0 and blocks >= 1")
    args = example if isinstance(example, tuple) else (example,)
    states = {name: m.training for name, m in models.items()}
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(*args)
    times: dict[str, list[float]] = {name: [] for name in models}
    blocks = min(blocks, runs)
    per_block = -(-runs // blocks)
    names = list(models)
    for block in range(blocks):
        for name in names if block % 2 == 0 else reversed(names):
            model = models[name]
            for _ in range(per_block):
                start = time.perf_counter()
                model(*args)
                times[name].append((time.perf_counter() - start) * 1e3)
    for name, model in models.items():
        model.train(states[name])
    out = {name: _stats(values, warmup) for name, values in times.items()}
    base = out[names[0]]["p50"]
    for stats in out.values():
        stats["p50_ratio"] = stats["p50"] / base
    return out


def _stats(times: list[float], warmup: int) -> dict[str, Any]:
    times = sorted(times)
    return {
        "p50": statistics.median(times),
        "p99": times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))],
        "mean": statistics.fmean(times),
        "runs": len(times),
        "warmup": warmup,
        "threads": torch.get_num_threads(),
    }
