"""Multi-threading for the kernels: our own few Python threads over numba's nogil serial kernels.

Why not numba's ``prange``: numba's OpenMP layer links the system libgomp while torch ships its own, and
two OpenMP runtimes in one process spin-wait against each other. A model alternating torch ops and numba
parallel kernels was measured 5-20x slower at times on this 2-core machine (dense and sparse alike); numba's
``workqueue`` layer did not scale at all (2 threads no faster than 1). Here each call splits its rows into
one chunk per thread (balanced by nonzeros), the caller runs the first chunk, pool threads the others; idle
pool threads block on a queue and never spin. The thread count follows ``torch.get_num_threads()``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# Below this much work (multiply-adds) a second thread costs more to wake than it saves.
MIN_PARALLEL_WORK = 150_000

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def count() -> int:
    """Threads to use: ``torch.get_num_threads()``, at most the number of CPUs."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prunekit-runtime")
        return _pool


def run(kernel: Callable, parts: Sequence[tuple]) -> None:
    """``kernel(*part)`` for every part, the first in the calling thread, concurrently."""
    if len(parts) == 1:
        kernel(*parts[0])
        return
    futures = [_executor(len(parts) - 1).submit(kernel, *part) for part in parts[1:]]
    kernel(*parts[0])
    for f in futures:
        f.result()


def chunks(work: int) -> int:
    """How many threads a call of ``work`` multiply-adds should use."""
    return count() if work >= MIN_PARALLEL_WORK else 1


def even_splits(n: int, parts: int, align: int = 16) -> list[int]:
    """``parts + 1`` boundaries over ``[0, n)``, inner ones multiples of ``align``."""
    inner = sorted({min(n, (n * i // parts) // align * align) for i in range(1, parts)})
    return [0, *[b for b in inner if 0 < b < n], n]
