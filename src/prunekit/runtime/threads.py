"""Multi-threading for the kernels: our own few Python threads over numba's nogil serial kernels.

Why not numba's ``prange``: numba's OpenMP layer links the system libgomp while torch ships its own, and
two OpenMP runtimes in one process spin-wait against each other. A model alternating torch ops and numba
parallel kernels was measured 5-20x slower at times on this 2-core machine (dense and sparse alike); numba's
``workqueue`` layer did not scale at all (2 threads no faster than 1). Here each call splits its rows into
one chunk per thread (balanced by nonzeros), the caller runs the first chunk, worker threads the others.
The thread count follows ``torch.get_num_threads()``.

How a chunk reaches a worker: waking a thread that sleeps on a lock or queue took ~50 us per call on the
2-vCPU VMs this was measured on (a ``ThreadPoolExecutor`` round trip with no work: 50 us), as much as half
of a ResNet layer. So each worker, after a chunk, *spins* for a while (:data:`SPIN_CYCLES`, ~1 ms, outside
the GIL) on a flag of its own, which bridges the Python glue between one kernel and the next; only then does
it sleep on a condition. The caller spins (outside the GIL) on each worker's "done" flag. A worker that has
seen its flag waits :data:`SETTLE_CYCLES` more before taking the GIL, so that the caller, which posted while
holding it, is inside its own nogil kernel by then (a thread that blocks on the GIL sleeps, and waking it
costs the same 50 us). Measured: a call split in two costs ~5-10 us more than half its serial time.

Workers spin only after a call made inside :func:`lingering` (a compiled segment's forward pass, where
kernel follows kernel); after any other call they sleep right after their chunk, and :func:`rest` sends
them to sleep at once (timings do, before each candidate). torch's OpenMP threads need the same cores: with
workers spinning after every call, a float32 ResNet-18 compiled per layer (torch and prunekit layers
alternating) ran 5x slower at 2 threads (53 ms against 10 ms with the workers asleep). Inside a segment
they keep spinning through its few torch steps: sent to sleep before each, the float32 70% ResNet-18 at 2
threads went from 14.5 to 22-37 ms (a worker woken while torch's OpenMP thread still spins on its core
starts its chunk up to a millisecond late).

A worker asleep for a moment is woken with its chunk (~50 us late). A call that finds a worker asleep for
longer (:data:`LONG_SLEEP_S`) runs all its parts itself and wakes the workers for the calls after it: a CPU
that idled for tens of milliseconds came back slowly (the chunks handed to it in the next few milliseconds
took 3-5x their time; 2-thread INT8 ResNet-18 after a 50 ms pause: 7.5-10.7 ms handing them out anyway,
4.9-5.5 ms this way, 3.1-3.2 ms back to back). That matters inside :func:`lingering`; after other calls a
roused worker sleeps again at once, so a per-layer call hands its chunk to a sleeping worker, as the pool
did. Where the spinning workers are busy (another Python thread calling), and on CPUs other than x86-64,
calls fall back to the pool.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from prunekit.runtime.kernels import _jit

SERIAL = "@1t"  # a report label's suffix: the kernel was timed faster on one thread and runs on one

# Below this much work (multiply-adds) a second thread costs more to wake than it saves.
MIN_PARALLEL_WORK = 150_000
SPIN_CYCLES = 3_000_000  # how long a worker spins for the next chunk (time stamp counter cycles, ~1 ms)
LONG_SLEEP_S = 0.005  # a worker asleep longer runs on a CPU that comes back slowly: the call goes alone
SETTLE_CYCLES = 30_000  # ~10 us: the caller enters its own kernel (and drops the GIL) meanwhile
_LINE = 16  # int64 slots per flag: one flag per 128 bytes, no two flags on one cache line
# the spin loops time themselves with the time stamp counter (``llvm.readcyclecounter``), x86 only
SPINS = platform.machine().lower() in ("x86_64", "amd64")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_spinner: _Spinner | None = None
_local = threading.local()  # .linger: this thread's calls leave the workers spinning (lingering())


@cache
def _cpus() -> int:
    """The number of CPUs, read once: ``os.cpu_count()`` reads a file under /sys on Linux (~7 us), and a
    segment asks once per kernel call."""
    return os.cpu_count() or 1


def count() -> int:
    """Threads to use: ``torch.get_num_threads()``, at most the number of CPUs."""
    return max(1, min(torch.get_num_threads(), _cpus()))


# -- flags shared with the workers, read and written outside the GIL -----------------------------------
@intrinsic
def _load_acquire(typingctx, flags, i):
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load_atomic(builder.gep(data, [args[1]]), "acquire", 8)

    return types.int64(flags, types.intp), codegen


@intrinsic
def _store_release(typingctx, flags, i, value):
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        builder.store_atomic(args[2], builder.gep(data, [args[1]]), "release", 8)
        return context.get_dummy_value()

    return types.void(flags, types.intp, types.int64), codegen


@intrinsic
def _cycles(typingctx):
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        return builder.call(builder.module.declare_intrinsic("llvm.readcyclecounter", fnty=fnty), [])

    return types.int64(), codegen


@_jit(fastmath=False)
def _store_then_wait(flags, si, sv, wi, old, limit, settle):
    """``flags[si] = sv`` (when ``si >= 0``), then spin until ``flags[wi] != old``, at most ``limit``
    cycles: the new value (after ``settle`` more cycles), or ``old`` on time-out."""
    if si >= 0:
        _store_release(flags, si, sv)
    t0 = _cycles()
    while True:
        for _ in range(32):
            v = _load_acquire(flags, wi)
            if v != old:
                t1 = _cycles()
                while _cycles() - t1 < settle:
                    pass
                return v
        if _cycles() - t0 > limit:
            return old


class _Spinner:
    """``workers`` daemon threads, each with a "post" and a "done" flag (sequence numbers)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.flags = np.zeros(2 * workers * _LINE, np.int64)
        self.tasks: list[tuple | None] = [None] * workers
        self.errors: list[BaseException | None] = [None] * workers
        self.idle = [False] * workers
        self.rouse = [False] * workers  # wake up and spin: a call is coming
        self.slept = [0.0] * workers  # when each fell asleep (time.perf_counter)
        self.cv = threading.Condition()
        self.busy = threading.Lock()  # one caller at a time
        self.seq = 0
        self.linger = 0  # cycles a worker spins after its chunk (the caller's lingering() sets it)
        self.stopped = False
        for w in range(workers):
            threading.Thread(target=self._loop, args=(w,), daemon=True, name=f"prunekit-spin-{w}").start()

    def _loop(self, w: int) -> None:
        post, done = 2 * w * _LINE, (2 * w + 1) * _LINE
        seen, finished = 0, -1
        while not self.stopped:
            v = _store_then_wait(
                self.flags, done if finished >= 0 else -1, finished, post, seen, self.linger, SETTLE_CYCLES
            )
            finished = -1
            task = self.tasks[w]  # (post number, kernel, args): the chunk of the call that posted it
            if v != seen and (task is None or task[0] != v):
                # a rest() post (no chunk of its own); when the next call's chunk is already here, its post
                # is in the flag or about to be: the next wait (or the sleep's re-check) picks it up
                seen = v
                if task is not None and task[0] > v:
                    continue
            if v == seen:  # nothing within the spin, or told to rest: sleep until posted
                with self.cv:
                    self.idle[w], self.slept[w] = True, time.perf_counter()
                    while self.flags[post] == seen and not self.stopped and not self.rouse[w]:
                        self.cv.wait()
                    self.idle[w] = self.rouse[w] = False
                continue
            seen = v
            _, kernel, args = task
            try:
                kernel(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                self.errors[w] = exc
            self.tasks[w] = None
            finished = seen

    def run(self, kernel: Callable, parts: Sequence[tuple]) -> None:
        n = len(parts) - 1
        self.linger = SPIN_CYCLES if getattr(_local, "linger", False) else 0
        now = time.perf_counter()
        if any(self.idle[w] and now - self.slept[w] > LONG_SLEEP_S for w in range(n)):
            # asleep for long: this call runs alone while the workers wake up for the next ones
            with self.cv:
                self.rouse[:n] = [True] * n
                self.cv.notify_all()
            for part in parts:
                kernel(*part)
            return
        self.seq += 1
        seq = self.seq
        for w in range(n):
            self.tasks[w], self.errors[w] = (seq, kernel, parts[w + 1]), None
            self.flags[2 * w * _LINE] = seq
        if any(self.idle[:n]):  # asleep for a moment: woken now, it starts ~50 us late
            with self.cv:
                self.cv.notify_all()
        try:
            kernel(*parts[0])
        finally:  # the workers' chunks end before this call does, even when the caller's part raised
            for w in range(n):
                if self.idle[w] and self.flags[(2 * w + 1) * _LINE] != seq:  # asleep before the post: wake
                    with self.cv:
                        self.cv.notify_all()
                done = (2 * w + 1) * _LINE
                while self.flags[done] != seq:
                    _store_then_wait(self.flags, -1, 0, done, self.flags[done], SPIN_CYCLES, 0)
        for w in range(n):
            if self.errors[w] is not None:
                exc, self.errors[w] = self.errors[w], None
                raise exc

    def rest(self) -> None:
        """Spinning workers go to sleep now (a post without a chunk); the caller holds ``busy``."""
        self.linger = 0
        for w in range(self.workers):
            if not self.idle[w]:
                self.seq += 1
                self.tasks[w] = None
                self.flags[2 * w * _LINE] = self.seq

    def stop(self) -> None:
        with self.busy:  # after the call in flight, if any: its workers finish their chunks first
            self.stopped = True
            with self.cv:
                self.cv.notify_all()


def _reset_after_fork() -> None:  # a forked child has none of the parent's threads
    global _pool, _spinner, _lock
    _pool, _spinner, _lock = None, None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prunekit-runtime")
        return _pool


def _spinning(workers: int) -> _Spinner:
    global _spinner
    with _lock:
        if _spinner is None or _spinner.workers < workers:
            if _spinner is not None:
                _spinner.stop()
            _spinner = _Spinner(workers)
        return _spinner


def run(kernel: Callable, parts: Sequence[tuple]) -> None:
    """``kernel(*part)`` for every part, the first in the calling thread, concurrently (``kernel``: a
    nogil numba function, or any callable that releases the GIL). Recorded inside :func:`recording`."""
    calls = getattr(_local, "calls", None)
    if calls is not None:
        calls.append((kernel, list(parts)))
        _local.calls = None  # the calls a kernel makes in turn are part of it
        try:
            return run(kernel, parts)
        finally:
            _local.calls = calls
    if len(parts) == 1:
        kernel(*parts[0])
        return
    spinner = _spinning(len(parts) - 1) if SPINS else None
    if spinner is not None and spinner.busy.acquire(blocking=False):
        try:
            spinner.run(kernel, parts)
        finally:
            spinner.busy.release()
        return
    futures = [_executor(len(parts) - 1).submit(kernel, *part) for part in parts[1:]]
    kernel(*parts[0])
    for f in futures:
        f.result()


def call(kernel: Callable, *args):
    """``kernel(*args)`` on the calling thread (a glue kernel: a gather, a pool, a small product), recorded
    like :func:`run` inside :func:`recording`; returns what the kernel returns."""
    calls = getattr(_local, "calls", None)
    if calls is None:
        return kernel(*args)
    calls.append((kernel, [args]))
    _local.calls = None  # the calls a kernel makes in turn are part of it
    try:
        return kernel(*args)
    finally:
        _local.calls = calls


@contextmanager
def recording() -> Iterator[list]:
    """Inside: every kernel this thread launches through :func:`run` or :func:`call` is appended to the
    yielded list as ``(kernel, parts)``, with its arguments as passed (``runtime.replay`` replays them)."""
    before = getattr(_local, "calls", None)
    _local.calls = calls = []
    try:
        yield calls
    finally:
        _local.calls = before


@contextmanager
def lingering() -> Iterator[None]:
    """Inside: the workers spin after each chunk for the next one (~1 ms), for a run of prunekit kernels
    with only Python glue between them (a segment's forward pass). They are not sent to sleep on leaving:
    a forward pass right after this one (a camera loop) finds them awake, and torch after it shares the
    second core for at most that last spin (sending them to sleep cost the next forward pass its wake-up:
    2-thread INT8 50%-channel ResNet-18, 3 calls in a row beside other engines, 3.45 -> 4.20 ms)."""
    before = getattr(_local, "linger", False)
    _local.linger = True
    try:
        yield
    finally:
        _local.linger = before


def rest() -> None:
    """Spinning workers go to sleep now (their cores are free for torch's OpenMP threads, or for a timing
    that should not inherit them)."""
    spinner = _spinner
    if spinner is not None and spinner.busy.acquire(blocking=False):
        try:
            spinner.rest()
        finally:
            spinner.busy.release()


def chunks(work: int) -> int:
    """How many threads a call of ``work`` multiply-adds should use."""
    return count() if work >= MIN_PARALLEL_WORK else 1


def even_splits(n: int, parts: int, align: int = 16) -> list[int]:
    """``parts + 1`` boundaries over ``[0, n)``, inner ones multiples of ``align``."""
    inner = sorted({min(n, (n * i // parts) // align * align) for i in range(1, parts)})
    return [0, *[b for b in inner if 0 < b < n], n]
