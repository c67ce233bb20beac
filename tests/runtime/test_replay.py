"""runtime.replay: a compiled segment's pass as its list of kernel calls, used only where it provably computes
what the steps compute (the same calls on any input but the image's array; bit for bit on a third input)."""

import copy

import numpy as np
import pytest
import torch

import prunekit.runtime as rt
from fixtures.int8nets import prune_random, randomize_bn  # noqa: E402
from prunekit.masking import squash
from prunekit.models import SmallResNet
from prunekit.quant.ptq import quantize_model
from prunekit.runtime import replay, threads
from prunekit.runtime import segment as S
from prunekit.runtime.gemv import GemvLinear

FAST = dict(budget_s=0.005, min_reps=2, max_reps=3)


def add_into(a, b, out):  # a stand-in kernel: numpy, called through threads.call like the glue kernels
    out[:] = a + b


def test_a_pass_is_replayed_with_the_new_input_in_its_slot():
    const, buf = np.arange(6, dtype=np.float32), np.empty(6, np.float32)

    def stepwise(x):
        threads.call(add_into, x.contiguous().numpy().reshape(-1), const, buf)
        threads.run(add_into, [(buf, const, buf)])
        return torch.from_numpy(buf.copy())

    example = torch.ones(2, 3)
    made = replay.build(stepwise, lambda: torch.from_numpy(buf.copy()), example)
    assert made is not None and [(c, p, a) for c, p, a, _ in made.inputs] == [(0, 0, 0)]
    held = [a for _, parts in made.calls for part in parts for a in part if isinstance(a, np.ndarray)]
    assert not any(np.shares_memory(a, example.numpy()) for a in held)  # no user data kept
    x = torch.randn(2, 3)
    c = torch.from_numpy(const)
    assert torch.equal(made(x), (x.reshape(-1) + c) + c)


@pytest.mark.parametrize("leak", ["fresh array", "scalar from the input", "output ignores the input"])
def test_a_pass_that_depends_on_more_than_the_image_is_not_replayed(leak):
    buf, zeros = np.empty(6, np.float32), np.zeros(6, np.float32)

    def stepwise(x):
        flat = x.contiguous().numpy().reshape(-1)
        if leak == "fresh array":  # a temporary made per call: another array every time
            threads.call(add_into, flat, np.ones(6, np.float32), buf)
        elif leak == "scalar from the input":  # a value computed from the input, frozen in a replay
            threads.call(add_into, flat, np.float32(flat.sum()), buf)
        else:  # the same calls every time, but nothing proves the replay recomputes anything
            threads.call(add_into, zeros, np.float32(1), buf)
        return torch.from_numpy(buf.copy())

    assert replay.build(stepwise, lambda: torch.from_numpy(buf.copy()), torch.ones(2, 3)) is None


def small_cnn() -> SmallResNet:
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16))
    randomize_bn(model)
    prune_random(model, 0.6, torch.Generator().manual_seed(0))
    return model.eval()


def on_kernels(q, x) -> S.Segmented:
    """``q``'s segment with every convolution on a kernel where it can be (chosen here, not by timing)
    and the classifier on the int8 gemv."""
    seg, why = S.build(squash(copy.deepcopy(q)).eval(), x)
    assert seg is not None, why
    for step in seg.conv_steps():  # AVX2: a signed input image keeps the stem on torch's dense path
        step.kernel = step.make_kernel(*step.configs()[0]) if step.usable() is None else None
    pool = seg.steps[-1]
    name = pool.tail[-1].target
    parent, _, child = name.rpartition(".")
    head = seg.gm.get_submodule(name)
    setattr(seg.gm.get_submodule(parent) if parent else seg.gm, child, GemvLinear.from_quantized(head))
    return seg


def test_an_int8_segment_replays_its_kernels_bit_for_bit_at_each_thread_count():
    model = small_cnn()
    x = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    q = quantize_model(model, activations="static", calibration=[torch.randn_like(x)], classifier=True)
    seg = on_kernels(q, x)
    seg.prepare_replay(x)
    assert seg.replay_reason is None and seg.replays[1] is not None
    with threads.recording() as calls, torch.inference_mode():
        seg._stepwise(x)
    assert len(seg.replays[1].calls) == len(calls) > len(seg.conv_steps())
    inputs = [torch.randn_like(x) * s for s in (0.5, 1, 3)] + [torch.zeros_like(x)]
    with torch.inference_mode():
        for inp in inputs:
            assert torch.equal(seg(inp), q(inp))
        y = seg(inputs[0])
        seg(inputs[1])
        assert torch.equal(y, q(inputs[0]))  # outputs are copies: the next call does not change them
        torch.set_num_threads(2)  # a new thread count: its own replay, built on the first call
        try:
            for inp in inputs:
                assert torch.equal(seg(inp), q(inp))
        finally:
            torch.set_num_threads(1)
    assert set(seg.replays) == {1, 2} and seg.replays[2] is not None


def test_compile_replays_an_int8_cnn_where_every_step_is_a_kernel_and_says_so():
    model = small_cnn()
    x = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    q = quantize_model(model, activations="static", calibration=[torch.randn_like(x)], classifier=True)
    c = rt.compile(q, x, **FAST)
    if rt.report(c).mode != "segments":
        pytest.skip("segments measured slower than dense here: nothing to replay")
    why, _ = c._replayable()  # timing decides whether a layer runs on torch's dense path
    assert c.replay_reason == (why or None) and (c.replays[1] is None) == (why is not None)
    assert ("replayed as its kernel calls" if why is None else why) in rt.report(c).note
    with torch.inference_mode():
        for inp in (x, 3 * x, torch.zeros_like(x)):
            assert torch.equal(c(inp), q(inp))


def test_a_float_cnn_whose_pool_runs_in_torch_runs_step_by_step_and_says_why():
    model = small_cnn()
    x = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    c = rt.compile(model, x, **FAST)
    if rt.report(c).mode != "segments":
        pytest.skip("segments measured slower than dense here")
    assert (
        c.replays[1] is None and c.replay_reason == "its output is not an int8 global pool with a classifier"
    )
    assert "run step by step" in rt.report(c).note
    with torch.inference_mode():
        assert (c(x) - model(x)).abs().max() <= 1e-4 * model(x).abs().max()


def test_the_calls_a_recorded_kernel_makes_are_part_of_it():
    """``threads.call`` / ``threads.run`` inside a recorded call (the int8 dense path's epilogue) are not
    recorded again: a replay runs them once, through the outer call."""
    buf = np.ones(3, np.float32)

    def outer(b):
        threads.call(add_into, b, b, b)
        threads.run(add_into, [(b, b, b)])

    with threads.recording() as calls:
        threads.call(outer, buf)
        threads.run(add_into, [(buf, buf, buf)])
    assert [k for k, _ in calls] == [outer, add_into]
    assert np.array_equal(buf, np.full(3, 8, np.float32))
