"""A compiled segment's forward pass replayed as the list of kernel calls it makes.

A segment (:mod:`prunekit.runtime.segment`) runs its steps in Python: per step a few attribute lookups and
dict operations, the gather, the kernel's argument tuple, the thread split, then numba's dispatch. On the
INT8 ResNet-18 at 224 x 224, one thread, AMD EPYC Zen 4, that glue measured 0.26-0.33 ms of a 3.2-3.6 ms
pass (50% channels) and 0.55 ms of 11 ms (dense) with the caches warm, 0.4-0.7 ms after a 30 ms pause
(the interpreter's own state is then out of the caches too). Every buffer a segment uses is allocated once
and never moves, so its pass is the same kernel calls with the same arguments every time, but for the
input image: :class:`Replay` keeps that list and calls it in order.

Only where it provably is the same (:func:`build`): two passes on different inputs are recorded
(``threads.recording``) and must make the same calls (the same kernels, arrays on the same memory, equal
scalars; only the input image's array differs), then the replay is checked bit for bit against the stepwise
pass on a third input. Segments with work that is not a kernel call (a torch step, a convolution on torch's
dense path, a classifier that is not on prunekit's gemv kernel) are not replayed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from prunekit.runtime import threads


class Replay:
    """``calls``: ``(kernel, parts)`` in order, each part the argument tuple of one thread's share;
    ``inputs``: ``(call, part, arg, dtype)`` where the input image goes (as a flat array of ``dtype`` on
    its memory); ``finish``: the output tensor, read after the last call."""

    def __init__(self, calls: list, inputs: list[tuple], finish: Callable[[], Tensor]) -> None:
        self.calls, self.inputs, self.finish = calls, inputs, finish

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.contiguous().numpy().reshape(-1)
        calls = self.calls
        if self.inputs:
            calls = list(calls)
            for c, p, a, dtype in self.inputs:
                kernel, parts = calls[c]
                parts = list(parts)
                args = list(parts[p])
                args[a] = flat.view(dtype)
                parts[p] = tuple(args)
                calls[c] = (kernel, parts)
        for kernel, parts in calls:
            if len(parts) == 1:
                kernel(*parts[0])
            else:
                threads.run(kernel, parts)
        return self.finish()


def build(
    stepwise: Callable[[Tensor], Tensor], finish: Callable[[], Tensor], example: Tensor
) -> Replay | None:
    """The replay of ``stepwise`` (a segment's pass, whose kernels go through ``threads.run`` /
    ``threads.call``), or None where its calls depend on more than the input image. ``finish`` reads the
    pass's output from the buffers the last calls write."""
    g = torch.Generator().manual_seed(0)
    scale = float(example.abs().mean()) + 1e-3
    xs = [example.contiguous()] + [torch.randn(example.shape, generator=g) * scale for _ in range(2)]
    recorded = []
    with torch.inference_mode():
        for x in xs[:2]:
            with threads.recording() as calls:
                stepwise(x)
            recorded.append(calls)
        inputs = _compare(recorded[0], xs[0], recorded[1], xs[1])
        if inputs is None:
            return None
        replay = Replay(_without_input(recorded[0], inputs), inputs, finish)
        want = stepwise(xs[2])
        if torch.equal(want, stepwise(xs[1])):  # an output that does not depend on the input proves nothing
            return None
        return replay if torch.equal(replay(xs[2]), want) else None


def _compare(first: list, x1: Tensor, second: list, x2: Tensor) -> list[tuple] | None:
    """Where the two recordings differ only by the input image: its argument slots; else None."""
    if len(first) != len(second):
        return None
    inputs = []
    for c, ((k1, parts1), (k2, parts2)) in enumerate(zip(first, second)):
        if k1 != k2 or len(parts1) != len(parts2):  # ==: a bound method is made anew at each access
            return None
        for p, (args1, args2) in enumerate(zip(parts1, parts2)):
            if len(args1) != len(args2):
                return None
            for a, (v1, v2) in enumerate(zip(args1, args2)):
                if isinstance(v1, np.ndarray) and isinstance(v2, np.ndarray):
                    if _is_input(v1, x1) and _is_input(v2, x2):
                        inputs.append((c, p, a, v1.dtype))
                    elif not _same_memory(v1, v2):
                        return None
                elif isinstance(v1, np.ndarray) or isinstance(v2, np.ndarray) or not _same_value(v1, v2):
                    return None
    return inputs


def _without_input(calls: list, inputs: list[tuple]) -> list:
    """``calls`` with an empty array where the input image goes (a replay holds no user data)."""
    calls = list(calls)
    for c, p, a, dtype in inputs:
        kernel, parts = calls[c]
        parts = list(parts)
        parts[p] = parts[p][:a] + (np.empty(0, dtype),) + parts[p][a + 1 :]
        calls[c] = (kernel, parts)
    return calls


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def _is_input(a: np.ndarray, x: Tensor) -> bool:
    """``a`` is the input image's memory, flat (how the segment's first gather reads it)."""
    return a.ndim == 1 and a.nbytes == x.numel() * x.element_size() and a.ctypes.data == x.data_ptr()


def _same_value(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_value(u, v) for u, v in zip(a, b))
    return bool(a == b)
