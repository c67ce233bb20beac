"""Which INT8 engine runs a model: :func:`choose_int8` (the rule) and :func:`fastest_int8` (times the
candidates and applies it), with the pruned float32 model as the bar an INT8 model must beat.

The dense engines a user would deploy instead (torch's x86 INT8, onnxruntime float32 and INT8) live in
:mod:`prunekit.export.engines` (one implementation, shared with ``prunekit bench`` and the demo); here they
join as *inexact* candidates: they requantize with their own rules (float multipliers, zero points, their
own calibration), so their integers are not prunekit's (:mod:`prunekit.quant.rounding`). prunekit's own
INT8 models (e.g. ``prunekit.runtime.compile`` of a ``quantize_model`` result) are exact by construction.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.export.engines import ORT_INT8, TORCH_INT8, dense_baselines

FLOAT32 = "float32"


@dataclass(frozen=True)
class Int8Choice:
    """What :func:`choose_int8` decided: ``engine`` (a candidate's name, or :data:`FLOAT32`), its median,
    and why."""

    engine: str
    us: float
    reason: str


def choose_int8(
    candidates: Mapping[str, tuple[float, bool]],
    float_us: float | None,
    *,
    allow_inexact: bool = False,
    margin: float = 0.0,
) -> Int8Choice:
    """The INT8 engine to run: the fastest candidate (``name -> (median us, exact)``; exact: computes
    prunekit's integers bit for bit), inexact ones only with ``allow_inexact``; and never slower than the
    pruned float32 model it came from (``float_us``): when every allowed INT8 engine is more than
    ``margin`` slower than that, the answer is :data:`FLOAT32` (run the float32 model; INT8 buys size
    there, not speed). Pure: timings in, a decision out."""
    allowed = {k: us for k, (us, exact) in candidates.items() if exact or allow_inexact}
    if not allowed:
        if float_us is None:
            raise PrunekitError("choose_int8: no allowed INT8 engine and no float32 time to fall back on")
        return Int8Choice(FLOAT32, float_us, "no allowed INT8 engine")
    best = min(allowed, key=allowed.get)
    if float_us is not None and allowed[best] > float_us * (1.0 + margin):
        return Int8Choice(
            FLOAT32,
            float_us,
            f"the fastest INT8 engine ({best}, {allowed[best]:.0f} us) is slower than float32",
        )
    skipped = [
        k for k, (us, exact) in candidates.items() if not exact and not allow_inexact and us < allowed[best]
    ]
    note = f"; faster but not prunekit's integers: {', '.join(skipped)}" if skipped else ""
    return Int8Choice(best, allowed[best], f"fastest allowed INT8 engine{note}")


def _median_us(fns: Mapping[str, object], x: Tensor, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter_ns()
                fns[k](x)
                samples[k].append((time.perf_counter_ns() - t0) / 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def fastest_int8(
    int8_models: Mapping[str, nn.Module],
    example: Tensor,
    *,
    float_model: nn.Module | None = None,
    float_source: nn.Module | None = None,
    calibration: Iterable[Tensor] | None = None,
    allow_inexact: bool = False,
    rounds: int = 15,
) -> tuple[nn.Module, Int8Choice, dict[str, float]]:
    """Time INT8 engines on ``example`` (interleaved) and run :func:`choose_int8` over them.

    ``int8_models``: prunekit INT8 models (e.g. ``{"prunekit": runtime.compile(int8)}``), exact by
    construction. With ``allow_inexact`` and the float32 ``float_source`` + ``calibration``, the dense INT8
    engines of :mod:`prunekit.export.engines` built from it (``torch-x86-int8``, ``onnxruntime-int8``; one
    that cannot be built here is left out) join as inexact candidates. ``float_model``:
    the pruned float32 model (compiled) the INT8 one must not be slower than. Returns the chosen module,
    the choice and every median (us)."""
    candidates: dict[str, nn.Module] = dict(int8_models)
    exact = dict.fromkeys(candidates, True)
    if allow_inexact:
        if float_source is None or calibration is None:
            raise PrunekitError("fastest_int8: allow_inexact needs float_source= and calibration=")
        for engine in dense_baselines(float_source, example, list(calibration), names=(TORCH_INT8, ORT_INT8)):
            if engine.model is not None:
                candidates[engine.name] = engine.model
                exact[engine.name] = False
    fns = dict(candidates)
    if float_model is not None:
        fns[FLOAT32] = float_model
    medians = _median_us(fns, example, rounds)
    float_us = medians.get(FLOAT32)
    choice = choose_int8(
        {k: (medians[k], exact[k]) for k in candidates}, float_us, allow_inexact=allow_inexact
    )
    chosen = float_model if choice.engine == FLOAT32 else candidates[choice.engine]
    return chosen, choice, medians
