"""runtime.threads: chunks handed to spinning workers compute what one thread computes, whatever the part
count, with two callers at once, and a chunk's exception reaches the caller; a worker asleep for a moment
gets its part, one asleep for long is woken while the call runs alone; segments run a kernel on one thread
where that measured faster (faked timings: no timing assertions)."""

import threading
import time

import numba
import numpy as np
import pytest
import torch

from prunekit.models import ResNet18
from prunekit.quant.ptq import quantize_model
from prunekit.runtime import segment as S
from prunekit.runtime import threads


@numba.njit(nogil=True)
def _fill(out, lo, hi, v):
    for i in range(lo, hi):
        out[i] = i * v


def _parts(out: np.ndarray, n: int, v: float) -> list[tuple]:
    cuts = threads.even_splits(out.size, n, align=1)
    return [(out, cuts[i], cuts[i + 1], v) for i in range(len(cuts) - 1)]


@pytest.mark.parametrize("n", [2, 3])
def test_every_part_is_computed_once_per_call(n):
    out = np.zeros(1000)
    for v in range(1, 300):
        threads.run(_fill, _parts(out, n, float(v)))
        assert np.array_equal(out, np.arange(1000) * float(v))


def test_without_the_spinning_workers_the_pool_computes_the_same(monkeypatch):
    monkeypatch.setattr(threads, "SPINS", False)  # CPUs other than x86-64
    out = np.zeros(1000)
    for v in range(1, 50):
        threads.run(_fill, _parts(out, 2, float(v)))
        assert np.array_equal(out, np.arange(1000) * float(v))


def _awake() -> threads._Spinner:
    """The spinner with its worker spinning (not asleep): the calls right after hand it their parts. Call it
    inside ``threads.lingering()`` (outside, workers sleep after each chunk)."""
    spinner = threads._spinning(1)
    deadline = time.monotonic() + 5
    while spinner.idle[0] or spinner.rouse[0]:
        assert time.monotonic() < deadline
        if spinner.idle[0] and not spinner.rouse[0]:  # asleep (again): a call wakes it
            threads.run(lambda i: None, [(0,), (1,)])
        time.sleep(0)  # lets the worker take the GIL
    # seen awake while holding the GIL: it cannot fall asleep before the next call's post (it needs the GIL
    # for that, and a post it sees on the way keeps it awake)
    return spinner


def test_the_other_parts_run_in_worker_threads():
    seen = []
    with threads.lingering():
        _awake()
        threads.run(lambda i: seen.append((i, threading.get_ident())), [(0,), (1,)])
    by_part = dict(seen)
    assert set(by_part) == {0, 1}
    assert by_part[0] == threading.get_ident() and by_part[1] != threading.get_ident()


def test_a_part_that_raises_raises_in_the_caller_and_the_next_call_works():
    def chunk(i):
        if i == 1:
            raise ValueError("chunk 1 failed")

    with pytest.raises(ValueError, match="chunk 1 failed"):
        threads.run(chunk, [(0,), (1,)])
    out = np.zeros(100)
    threads.run(_fill, _parts(out, 2, 2.0))
    assert np.array_equal(out, np.arange(100) * 2.0)


def test_when_the_callers_part_raises_the_workers_parts_still_finish_first():
    started, done = [], []

    def chunk(i):
        if i == 0:
            raise ValueError("chunk 0 failed")
        started.append(i)
        time.sleep(0.05)
        done.append(i)

    with threads.lingering(), pytest.raises(ValueError, match="chunk 0 failed"):
        _awake()
        threads.run(chunk, [(0,), (1,)])
    assert done == started == [1]


def _asleep() -> threads._Spinner:
    """The spinner with its worker asleep (past its spin window)."""
    threads.run(_fill, _parts(np.zeros(500), 2, 1.0))
    spinner = threads._spinning(1)
    deadline = time.monotonic() + 5
    while not spinner.idle[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spinner.idle[0]
    return spinner


def test_a_call_that_finds_a_worker_asleep_for_long_runs_alone_and_wakes_it(monkeypatch):
    monkeypatch.setattr(threads, "LONG_SLEEP_S", 0.0)
    spinner = _asleep()
    seen = []
    threads.run(lambda i: seen.append(threading.get_ident()), [(0,), (1,)])
    assert seen == [threading.get_ident()] * 2  # both parts in the caller
    deadline = time.monotonic() + 5
    while spinner.rouse[0] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not spinner.rouse[0]  # the worker woke up (and took the wake-up call)
    out = np.zeros(500)
    threads.run(_fill, _parts(out, 2, 3.0))
    assert np.array_equal(out, np.arange(500) * 3.0)


def test_a_worker_asleep_for_a_moment_is_woken_with_its_part(monkeypatch):
    monkeypatch.setattr(threads, "LONG_SLEEP_S", 1e9)
    _asleep()
    seen = {}
    threads.run(lambda i: seen.setdefault(i, threading.get_ident()), [(0,), (1,)])
    assert seen[0] == threading.get_ident() and seen[1] != threading.get_ident()


def test_two_callers_at_once_both_get_their_results():
    errors = []

    def caller(v: float) -> None:
        out = np.zeros(700)
        for _ in range(200):
            threads.run(_fill, _parts(out, 2, v))
            if not np.array_equal(out, np.arange(700) * v):
                errors.append(v)

    workers = [threading.Thread(target=caller, args=(float(v),)) for v in (2, 5)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors


@pytest.mark.parametrize("serial_faster", [True, False])
def test_segments_run_a_kernel_on_one_thread_where_that_measured_faster(serial_faster, monkeypatch):
    monkeypatch.setattr(threads, "count", lambda: 2)
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    timed = S.time_interleaved

    def fake(fns, rounds=7, warmup=1, calls=1):
        if set(fns) == {"threads", "serial"}:
            for fn in fns.values():
                fn()
            return {"threads": 2.0, "serial": 1.0} if serial_faster else {"threads": 1.0, "serial": 2.0}
        return timed(fns, rounds, warmup, calls)

    monkeypatch.setattr(S, "time_interleaved", fake)
    torch.manual_seed(0)
    model = ResNet18(10, width=0.125).eval()
    x = torch.randn(1, 3, 32, 32)
    q = quantize_model(model, activations="static", calibration=[x])
    seg, why = S.build(q, x)
    assert seg is not None, why
    S.tune(seg, x, rounds=1)
    tuned = [s for s in seg.conv_steps() if s.kernel is not None]
    assert tuned
    for s in tuned:
        assert s.kernel.serial == serial_faster
        assert s.choice.endswith(threads.SERIAL) == serial_faster
        assert len(s.kernel._geos()) == (1 if serial_faster else 2)
    with torch.inference_mode():
        assert torch.equal(seg(x), q(x))


def _idle_within(spinner: threads._Spinner, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not spinner.idle[0]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_workers_spin_only_after_lingering_calls_and_rest_when_told(monkeypatch):
    """torch's OpenMP threads need the cores: after a call outside ``lingering()`` a worker sleeps right
    after its chunk (even with an endless spin window), after one inside it spins for the next one until
    ``rest()`` puts it to sleep at once; the calls after that still get every part computed."""
    monkeypatch.setattr(threads, "SPIN_CYCLES", 10**15)  # a spin that never times out by itself
    out = np.zeros(500)
    threads.run(_fill, _parts(out, 2, 1.0))
    spinner = threads._spinning(1)
    assert _idle_within(spinner, 5.0)
    with threads.lingering():
        _awake()
        threads.run(_fill, _parts(out, 2, 2.0))
    assert not _idle_within(spinner, 0.2)  # still spinning 200 ms later
    threads.rest()
    assert _idle_within(spinner, 5.0)
    threads.run(_fill, _parts(out, 2, 4.0))
    assert np.array_equal(out, np.arange(500) * 4.0)
    assert _idle_within(spinner, 5.0)  # a plain call: asleep right after its chunk


def test_a_call_right_after_rest_is_not_mistaken_for_the_rest():
    """rest() posts without a chunk; a call posting right after it (before the worker read the rest post)
    used to have its chunk taken for the rest post's and then its own post taken for a rest: the caller
    waited forever. 40 rounds of (a lingering call, rest, a plain call), in a thread with a deadline."""
    failures = []

    def rounds() -> None:
        out = np.zeros(200)
        for v in range(1, 41):
            with threads.lingering():
                threads.run(_fill, _parts(out, 2, float(v)))
            threads.rest()
            threads.run(_fill, _parts(out, 2, float(v + 1)))
            if not np.array_equal(out, np.arange(200) * float(v + 1)):
                failures.append(v)

    t = threading.Thread(target=rounds, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and failures == []
