"""Whole-network segments (runtime.segment): the lowered graph computes what the model computes (float32
within 1e-4 of the output's magnitude, prunekit int8 bit for bit) on both instruction-set paths, whatever
tile or dense choice each convolution gets; unsupported pieces stay in torch; other input shapes run the
original graph. No timing assertions (docs/measuring.md)."""

import copy

import pytest
import torch
from torch import nn

import prunekit.runtime as rt
from prunekit.masking import squash
from prunekit.models import ResNet18, SmallResNet
from prunekit.quant.glue import QuantizeInput
from prunekit.quant.ptq import quantize_model
from prunekit.runtime import segment as S
from prunekit.runtime import threads
from prunekit.runtime.cpu import features
from prunekit.runtime.gemv import GemvLinear

ISAS = [("avx2", 8)] + ([("vnni512", 16)] if features().vnni else [])


def random_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def pruned(model: nn.Module, keep: float = 0.3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.mul_(torch.rand_like(m.weight) < keep)
    return model


class Mixed(nn.Module):
    """What segments must leave to torch: a depthwise conv, a non-ReLU activation, an average pool, a
    ReLU6 clamp, a residual whose operand is born in torch, and a max pool with padding."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.b = nn.Conv2d(8, 8, 3, 2, 1, dilation=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        y = self.act(self.a(x))
        z = torch.sigmoid(self.dw(y))
        y = self.b(y) + nn.functional.avg_pool2d(z, 2)
        y = self.pool(torch.relu(y))
        return self.c(y) - 1.0


def lower(model: nn.Module, x: torch.Tensor, vw: int, isa: str, pick: int = 0):
    seg, why = S.build(model, x, vw=vw, isa=isa)
    assert seg is not None, why
    for i, step in enumerate(seg.conv_steps()):  # alternate tiles / channel blocks / dense over the steps
        configs = step.configs()
        dense = step.usable() is not None or (i + pick) % 5 == 4
        step.kernel = None if dense else step.make_kernel(*configs[(i + pick) % len(configs)])
    return seg


def close(y, ref) -> bool:
    return y.shape == ref.shape and (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("isa,vw", ISAS)
def test_float32_segments_equal_the_model(isa, vw):
    torch.manual_seed(0)
    cases = [
        (pruned(random_bn(ResNet18(10, width=0.125))), torch.randn(1, 3, 40, 40)),
        (pruned(random_bn(SmallResNet(widths=(8, 16)))), torch.randn(1, 1, 8, 8)),
        (pruned(Mixed().eval()), torch.randn(1, 3, 16, 16)),
    ]
    for model, x in cases:
        for pick in range(2):
            seg = lower(model, x, vw, isa, pick)
            with torch.inference_mode():
                assert close(seg(x), model(x))


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("isa,vw", ISAS)
def test_int8_segments_equal_prunekit_int8_bit_for_bit(isa, vw, chain, monkeypatch):
    """Both epilogues: the integer chain (every step of an integer ResNet qualifies: ReLU or no clamp,
    one scale per value) and, with the chain switched off, the float spelling it replaces."""
    if not chain:
        monkeypatch.setattr(S, "_chain_ok", lambda step: False)
    torch.manual_seed(0)
    for model, x in [
        (pruned(random_bn(ResNet18(10, width=0.125))), torch.randn(1, 3, 40, 40)),
        (pruned(random_bn(SmallResNet(widths=(8, 12)))), torch.randn(1, 1, 8, 8)),
    ]:
        calib = [torch.randn_like(x) for _ in range(2)]
        q = quantize_model(model, activations="static", calibration=calib)
        assert hasattr(q, "int8_ops")  # the integer model: fixed-point requantization, integer adds
        for pick in range(2):
            seg = lower(q, x, vw, isa, pick)
            steps = seg.conv_steps()
            assert all(s.requant is not None for s in steps) and any(s.kernel is not None for s in steps)
            assert any(s.add is not None for s in steps)  # the residual QuantizedAdds fused into epilogues
            assert all(s.chain == chain for s in steps)
            if chain:  # residuals are read as bytes: no float32 planes are written for them
                assert all(s.residual.fbuf is None for s in steps if s.residual is not None)
            # the global average pool sums the last block's exact bytes (torch's module without the chain)
            pools = [s for s in seg.steps if isinstance(s, S.GlobalPoolStep)]
            assert len(pools) == 1 and pools[0].exact == chain
            # ... and runs the flatten and the classifier after it (no steps of their own)
            assert [n.name for n in pools[0].tail] == ["flatten", "fc"]
            assert not any(isinstance(s, S.TorchStep) and s.node in pools[0].tail for s in seg.steps)
            # the input quantizer is left to the first convolution (same scale, same integers)
            torch_modules = [
                seg.gm.get_submodule(s.node.target)
                for s in seg.steps
                if isinstance(s, S.TorchStep) and s.node.op == "call_module"
            ]
            assert not any(isinstance(m, QuantizeInput) for m in torch_modules)
            with torch.inference_mode():
                for inp in (x, calib[0], 3 * x):  # 3x: activations clamp at +-127
                    assert torch.equal(seg(inp), q(inp))


def test_segments_keep_unsupported_pieces_in_torch_and_other_shapes_on_the_graph():
    torch.manual_seed(1)
    model, x = pruned(Mixed().eval()), torch.randn(1, 3, 16, 16)
    seg = lower(model, x, *ISAS[0][::-1])
    torch_nodes = {s.node.name for s in seg.steps if isinstance(s, S.TorchStep)}
    assert {"dw", "sigmoid", "avg_pool2d"} <= torch_nodes
    assert [s.name for s in seg.conv_steps()] == ["a", "b", "c"]
    assert seg.conv_steps()[0].clamp == (0.0, 6.0)
    with torch.inference_mode():
        x2 = torch.randn(2, 3, 8, 8)
        assert close(seg(x2), model(x2))


def test_compile_reports_segments_engines_and_macs():
    torch.manual_seed(2)
    model = squash(pruned(random_bn(ResNet18(10, width=0.125)), keep=0.2))
    x = torch.randn(1, 3, 48, 48)
    compiled = rt.compile(model, x, budget_s=0.01, min_reps=3, max_reps=5)
    report = rt.report(compiled)
    assert set(report.whole) <= {"dense", "segments"}
    assert report.mode in ("segments", "per-layer")
    assert 0.15 < report.macs_remaining < 0.3  # 20% of every conv kept; the classifier dense (its MACs tiny)
    with torch.inference_mode():
        assert close(compiled(x), model(x))
    if report.mode == "segments":
        convs = [d for d in report.layers if d.kind == "Conv2d"]
        assert len(convs) == 20 and all(d.engine for d in convs)
        assert all(d.chosen == "dense" or d.chosen in d.candidates for d in convs)
    int8 = quantize_model(model, activations="static", calibration=[torch.randn_like(x)])
    compiled8 = rt.compile(int8, x, budget_s=0.01, min_reps=3, max_reps=5)
    report8 = rt.report(compiled8)
    # the float32 classifier may get the runtime's float32 kernel (timed; its sums round in another order
    # than torch's): bit for bit only while it stays torch's
    fc = next(d for d in report8.layers if d.name == "fc")
    with torch.inference_mode():
        y8, ref8 = compiled8(x), int8(x)
    assert torch.equal(y8, ref8) if fc.chosen == "dense" else close(y8, ref8)
    assert all(d.engine for d in report8.layers)


def test_segments_need_one_batch1_image():
    model = SmallResNet(widths=(8,)).eval()
    assert S.build(model, torch.randn(2, 1, 8, 8))[0] is None
    assert "fx-trace" in S.build(_Untraceable(), torch.randn(1, 1, 8, 8))[1]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    assert "no convolution" in S.build(mlp, torch.randn(1, 1, 8, 8))[1]
    compiled = rt.compile(copy.deepcopy(mlp), torch.randn(1, 1, 8, 8), budget_s=0.01, min_reps=3, max_reps=5)
    assert "no convolution" in rt.report(compiled).note


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.conv(x)
        return self.conv(-x)


class Pooled(nn.Module):
    def __init__(self, k: int, s: int, p: int, relu: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.pool, self.relu = nn.MaxPool2d(k, s, p), relu

    def forward(self, x):
        y = self.a(x)
        return self.b(self.pool(torch.relu(y) if self.relu else y))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 1, 1), (3, 2, 1), (5, 3, 2), (2, 1, 1)])
def test_max_pools_in_the_layout_equal_torch(k, s, p, split, monkeypatch):
    """``split``: the units shared by threads (every layer big enough for a second thread)."""
    if split:
        monkeypatch.setattr(threads, "count", lambda: 2)
        monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    torch.manual_seed(k + s + p)
    x = torch.randn(1, 3, 13, 11)
    for relu in (True, False):
        model = Pooled(k, s, p, relu).eval()
        for isa, vw in ISAS:
            seg = lower(model, x, vw, isa)
            assert any(isinstance(st, S.PoolStep) for st in seg.steps)
            with torch.inference_mode():
                assert close(seg(x), model(x))
            q = quantize_model(model, activations="static", calibration=[x])
            seg = lower(q, x, vw, isa)
            pool = next(st for st in seg.steps if isinstance(st, S.PoolStep))
            # non-negative bytes with zero padding take the whole-row 3x3 kernel
            assert pool.zero_padded == (relu and (k, p) == (3, 1))
            with torch.inference_mode():
                assert torch.equal(seg(x), q(x))


def test_the_integer_chain_is_refused_wherever_it_would_round_differently():
    """``conv.chain_reason``: the integer epilogue only where recovering q from ``float32(q) * s`` is exact
    (its refusals name the reason)."""
    import numpy as np

    from prunekit.runtime.conv import IntAdd, Requant, chain_reason

    one = np.ones(1, np.int64)
    rq = Requant(one, one, one, -127, 127, 0.05)
    relu, none = (0.0, np.inf), (-np.inf, np.inf)
    assert chain_reason(rq, relu, None, 0.05, 9) is None and chain_reason(rq, none, None, None, 9) is None
    assert "float output form" in chain_reason(None, relu, None, 0.05, 9)
    wide = Requant(one, one, one, -(2**31), 2**31 - 1, 0.05)
    assert "wider than int8" in chain_reason(wide, relu, None, None, 9)
    assert "not a ReLU" in chain_reason(rq, (0.0, 6.0), None, 0.05, 9)
    assert "another scale" in chain_reason(rq, relu, None, 0.07, 9)
    add = IntAdd(0.05, 0.02, 0.08, 1, 1, 1)
    assert chain_reason(rq, relu, add, 0.08, 9) is None
    assert "another scale" in chain_reason(rq, relu, add, 0.05, 9)  # the add's output scale counts
    assert "rescales" in chain_reason(rq, relu, IntAdd(0.06, 0.02, 0.08, 1, 1, 1), 0.08, 9)
    tiny = Requant(one, one, one * 46, -127, 127, 0.05)  # its float64 requantization would not be exact
    assert "shift above 45" in chain_reason(tiny, relu, None, 0.05, 9)
    assert "int32" in chain_reason(Requant(one * 2**30, one, one, -127, 127, 0.05), relu, None, 0.05, 2**17)


@pytest.mark.skipif(not features().vnni, reason="the shared-load int8 kernel is AVX-512 VNNI only")
def test_shared_load_int8_kernel_equals_prunekit_int8_bit_for_bit():
    """conv.pack_group_blocks + conv_kernels._i8_group_tile (each activation load serves 4 output channels):
    on a dense integer ResNet every step offers it (the union of a group's blocks is its blocks) and,
    forced on every step with each tile and channel block, the outputs are prunekit's integers."""
    torch.manual_seed(0)
    for keep in (1.0, 0.3):
        model, x = pruned(random_bn(ResNet18(10, width=0.25)), keep=keep), torch.randn(1, 3, 40, 40)
        calib = [torch.randn_like(x) for _ in range(2)]
        q = quantize_model(model, activations="static", calibration=calib)
        seg, why = S.build(q, x, vw=16, isa="vnni512")
        assert seg is not None, why
        for i, step in enumerate(seg.conv_steps()):
            shared = [c for c in step.configs() if len(c) == 3]
            if keep == 1.0:
                assert shared and step._union_ratio() == 1.0
            step.kernel = step.make_kernel(*shared[i % len(shared)]) if shared else None
        assert sum(s.kernel is not None for s in seg.conv_steps()) >= len(seg.conv_steps()) - 1
        # int8 rows are a multiple of 4 positions (20-wide rows for the 20-wide maps here), not of 8
        assert any(s.out_pitch % 8 for s in seg.conv_steps())
        with torch.inference_mode():
            for inp in (x, calib[0], 3 * x):
                assert torch.equal(seg(inp), q(inp))


@pytest.mark.skipif(not features().vnni, reason="the channel-lane int8 sums are AVX-512 VNNI only")
def test_channel_lane_int8_sums_equal_prunekit_int8_bit_for_bit():
    """conv_channels (output channels in the lanes, then the ordinary epilogue on whole accumulators): every
    step of a dense and of a pruned integer ResNet offers it; forced on every step (residual adds, strided
    gathers, signed inputs, maps of odd widths), the outputs are prunekit's integers."""
    torch.manual_seed(1)
    for keep, size in ((1.0, 36), (0.3, 44)):
        model, x = pruned(random_bn(ResNet18(10, width=0.25)), keep=keep), torch.randn(1, 3, size, size)
        calib = [torch.randn_like(x) for _ in range(2)]
        q = quantize_model(model, activations="static", calibration=calib)
        seg, why = S.build(q, x, vw=16, isa="vnni512")
        assert seg is not None, why
        forced = 0
        for step in seg.conv_steps():
            lanes = [c for c in step.configs() if len(c) == 4]
            if keep == 1.0:
                assert lanes
            step.kernel = step.make_kernel(*lanes[0]) if lanes else None
            forced += bool(lanes)
        assert forced >= len(seg.conv_steps()) // 2
        with torch.inference_mode():
            for inp in (x, calib[0], 3 * x):
                assert torch.equal(seg(inp), q(inp))


@pytest.mark.parametrize("isa,vw", ISAS)
def test_a_downsample_reads_its_blocks_strided_gather_filled_by_whichever_runs_first(isa, vw):
    """conv_layout.gather_serves: a ResNet block's 1x1 stride-2 downsample shares the gather of its 3x3
    stride-2 convolution (same input, same fill). The pass fills it once, in the first of the two that runs
    a prunekit kernel: with the 3x3 on torch's dense path the downsample fills it itself."""
    torch.manual_seed(2)
    model, x = pruned(random_bn(ResNet18(10, width=0.25))), torch.randn(1, 3, 36, 36)
    for q in (model, quantize_model(model, activations="static", calibration=[torch.randn_like(x)])):
        seg = lower(q, x, vw, isa)
        steps = [s for s in seg.conv_steps() if not s.direct]
        for s in steps:
            s.kernel = s.make_kernel(*s.configs()[0]) if s.usable() is None else None
        pairs = [(a, b) for i, a in enumerate(steps) for b in steps[i + 1 :] if a.gbuf is b.gbuf]
        assert [b.geom.kernel for _, b in pairs] == [(1, 1)] * 3  # layers 2-4
        with torch.inference_mode():
            ref = q(x)
            check = torch.equal if q is not model else close
            assert check(seg(x), ref)
            for a, b in pairs:
                kept, a.kernel = a.kernel, None  # the 3x3 on the dense path: it leaves the gather alone
                x2 = torch.randn_like(x)  # so a gather left from the pass before would be stale
                assert b.kernel is not None and check(seg(x2), q(x2))
                a.kernel = kept


def test_the_classifier_after_the_global_pool_runs_on_its_compiled_kernel(monkeypatch):
    """compile swaps the classifier for a GemvLinear after the segments are built: the pool step finds it
    in the graph module and runs its kernel on the pooled vector (GemvLinear's own forward: the same
    numbers as calling the layer)."""
    torch.manual_seed(0)
    model = pruned(random_bn(ResNet18(10, width=0.125)))
    x = torch.randn(1, 3, 32, 32)
    q = quantize_model(model, activations="static", calibration=[torch.randn_like(x)])
    seg = lower(q, x, *ISAS[-1][::-1])
    pool = next(s for s in seg.steps if isinstance(s, S.GlobalPoolStep))
    assert pool.exact and [n.name for n in pool.tail] == ["flatten", "fc"]
    seg.gm.fc = GemvLinear(q.fc)
    calls = []
    gemv = GemvLinear.gemv
    monkeypatch.setattr(
        GemvLinear, "gemv", lambda self, v, out=None: calls.append(v.copy()) or gemv(self, v, out)
    )
    pooled = []
    q.int8_ops.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o.reshape(-1)))
    seg.replays[threads.count()] = None  # the steps themselves (building a replay runs them three times)
    with torch.inference_mode():
        y, ref = seg(x), q(x)
    assert len(calls) == 1 and torch.equal(torch.from_numpy(calls[0]), pooled[0])  # the pooled integers
    assert torch.equal(y, seg.gm.fc(torch.from_numpy(calls[0]).reshape(1, -1)))
    assert close(y, ref)
