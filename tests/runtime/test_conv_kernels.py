"""The direct sparse convolution kernels (runtime.conv_kernels via runtime.conv) against dense math.

float32: equal to ``F.conv2d`` within 1e-4 of the output's largest magnitude; int8: the int32 accumulators
equal the integer convolution exactly, and the layer equals ``prunekit.quant.layers.QuantizedConv2d`` bit for
bit. Shapes, strides, padding, dilation, sparsity, tile sizes and channel blocks are drawn by hypothesis; both
instruction-set paths run on any x86-64 machine with AVX2 (the VNNI one only where the CPU has it)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.quant import rounding
from prunekit.quant.layers import QuantizedConv2d
from prunekit.runtime import conv as C
from prunekit.runtime import conv_layout as L
from prunekit.runtime.cpu import features

ISAS = ["avx2"] + (["vnni512"] if features().vnni else [])
WIDTHS = [8] + ([16] if features().avx512 else [])
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_cases(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 13))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 13))
    return dict(
        cin=draw(st.integers(1, 9)), cout=draw(st.integers(1, 9)), kernel=(kh, kw), stride=(sh, sw),
        padding=(ph, pw), dilation=(dh, dw), h=h, w=w, sparsity=draw(st.sampled_from([0.0, 0.5, 0.8, 0.95])),
        seed=draw(st.integers(0, 2**16)), bias=draw(st.booleans()),
    )  # fmt: skip


def make_conv(case) -> nn.Conv2d:
    torch.manual_seed(case["seed"])
    conv = nn.Conv2d(
        case["cin"], case["cout"], case["kernel"], case["stride"], case["padding"], case["dilation"],
        bias=case["bias"],
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= case["sparsity"])
    return conv.eval()


@FAST
@given(
    case=conv_cases(), vw=st.sampled_from(WIDTHS), pick=st.integers(0, 3), cb=st.sampled_from([None, 1, 2, 5])
)
def test_float32_direct_conv_equals_dense_conv(case, vw, pick, cb):
    conv = make_conv(case)
    nv = C.tile_options(vw)[pick]
    layer = C.PlanesConv2d(conv, nv=nv, vw=vw, cb=cb)
    x = torch.randn(1, case["cin"], case["h"], case["w"])
    with torch.inference_mode():
        y, ref = layer(x), conv(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1e-30)


def _int8_sums(
    case, isa: str, nv: int, cbg, channels: bool = False, pitch: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A DirectConvI8 at scale 1, no bias, no clamp on random int8 weights (sparsity ``case["sparsity"]``)
    and activations (signed on VNNI: the +128 path, compensated): its float32 output, which is then the
    int32 accumulator itself (all below 2**24), and the integer convolution in float64. ``pitch``: the
    input is a planes tensor at that pitch, read directly (stride 1), not a gather."""
    torch.manual_seed(case["seed"])
    geom = C.ConvGeom(
        case["cin"], case["cout"], case["kernel"], case["stride"], case["padding"], case["dilation"]
    )
    wq = torch.randint(-127, 128, (case["cout"], case["cin"], *case["kernel"]), dtype=torch.int8)
    wq = wq * (torch.rand(wq.shape) >= case["sparsity"]).to(torch.int8)
    xq = torch.randint(
        0 if isa == "avx2" else -127, 128, (case["cin"], case["h"], case["w"]), dtype=torch.int8
    )
    offset = 128 if isa == "vnni512" else 0
    groups, (h, w) = -(-case["cin"] // 4), (case["h"], case["w"])
    ho, wo = L.conv_out_hw(h, w, *geom.args)
    if pitch is None:
        inp = L.gather(groups, h, w, *geom.args)
    else:
        (kh, kw), (ph, pw), (dh, dw) = geom.kernel, geom.padding, geom.dilation
        below = max(0, (ho - 1) + (kh - 1) * dh - ph - (h - 1))
        inp = L.planes(groups, h, w, ph, below, {j * dw - pw for j in range(kw)}, pitch=pitch)
        assert L.reads_directly(inp, *geom.args)
    out = L.planes(L.roundup(case["cout"], 4), ho, wo, 0, 0, (), pitch=inp.pitch)
    layer = C.DirectConvI8(
        wq.numpy(), np.ones(case["cout"], np.float32), None, geom, inp, C.Int8Out(floats=out),
        nv=nv, isa=isa, cbg=cbg, offset=offset, channels=channels,
    )  # fmt: skip
    packed = np.empty(groups * h * w, np.int32)
    L.quantize_pack(
        xq.numpy().astype(np.float32).reshape(-1), case["cin"], h * w, np.float32(1), offset, packed
    )
    X = inp.alloc(L.ZERO_OFFSET if offset else 0)
    L.fill(packed, 0, h * w, w, h, w, groups, X, L.fill_geo(inp), L.ZERO_OFFSET if offset else np.int32(0))
    Y = out.alloc()
    layer(X, None, F=Y)
    acc = np.empty((case["cout"], out.height, out.width), np.float32)
    L.read(Y, out.col0(), out.per_unit * out.plane, out.pitch, case["cout"], out.height, out.width,
           acc.reshape(-1).view(np.int32))  # fmt: skip
    ref = F.conv2d(xq[None].double(), wq.double(), None, geom.stride, geom.padding, geom.dilation)[0]
    return acc.astype(np.int64), ref.numpy().astype(np.int64)


@FAST
@given(
    case=conv_cases(), isa=st.sampled_from(ISAS), pick=st.integers(0, 3), cbg=st.sampled_from([None, 1, 2])
)
def test_int8_accumulators_are_the_exact_integer_convolution(case, isa, pick, cbg):
    vw = 16 if isa == "vnni512" else 8
    acc, ref = _int8_sums(case, isa, C.tile_options(vw)[pick], cbg)
    assert np.array_equal(acc, ref)


@st.composite
def direct_cases(draw):
    """Stride-1 convolutions whose output is no larger than the input (what reads a planes tensor)."""
    case = draw(conv_cases())
    (kh, kw), (dh, dw) = case["kernel"], case["dilation"]
    case["stride"] = (1, 1)
    case["padding"] = (draw(st.integers(0, dh * (kh - 1) // 2)), draw(st.integers(0, dw * (kw - 1) // 2)))
    case["h"], case["w"] = draw(st.integers(dh * (kh - 1) + 1, 11)), draw(st.integers(dw * (kw - 1) + 1, 11))
    return case


@FAST
@given(case=direct_cases(), isa=st.sampled_from(ISAS), pick=st.integers(0, 3), extra=st.integers(0, 4))
def test_int8_direct_reads_of_planes_are_exact_with_shifted_copies_or_zero_columns(case, isa, pick, extra):
    """A planes tensor stores a copy per column shift its readers need, except the shifts the zero columns
    at the end of its rows cover (``|shift| <= pitch - width``): those taps read the unshifted plane
    ``shift`` positions over. Either way the sums are the integer convolution."""
    vw = 16 if isa == "vnni512" else 8
    pitch = L.roundup(case["w"] + extra, 4)
    acc, ref = _int8_sums(case, isa, C.tile_options(vw)[pick], None, pitch=pitch)
    assert np.array_equal(acc, ref)
    (_, kw), (_, pw), (_, dw) = case["kernel"], case["padding"], case["dilation"]
    shifts = {j * dw - pw for j in range(kw)}
    stored = L.planes(1, case["h"], case["w"], 0, 0, shifts, pitch=pitch).cols
    assert set(stored) == {d for d in shifts if abs(d) > pitch - case["w"]} | {0}


@pytest.mark.skipif(not features().vnni, reason="the channel-lane int8 sums are AVX-512 VNNI only")
@FAST
@given(case=conv_cases(), cout=st.integers(1, 70), pick=st.integers(0, 1), split=st.booleans())
def test_int8_channel_lane_sums_are_the_exact_integer_convolution(case, cout, pick, split):
    """conv_channels: output channels in the lanes, runs of 1-8 positions per row, 1-3 blocks of 32
    channels (``split``: the blocks shared by two threads)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.threads, "count", lambda: 2 if split else 1)
        mp.setattr(C.threads, "MIN_PARALLEL_WORK", 0)
        acc, ref = _int8_sums(dict(case, cout=cout), "vnni512", C.K.SHARED_NV[pick], None, channels=True)
    assert np.array_equal(acc, ref)


def test_channel_lane_runs_cover_every_position_of_a_row_once():
    from prunekit.runtime.conv_channels import MAX_RUN, run_lengths, runs

    for width in range(1, 130):
        lens = run_lengths(width)
        assert sum(lens) == width and max(lens) <= MAX_RUN and min(lens) >= 1
        assert len(lens) == -(-width // MAX_RUN) or (width % 7 == 0 and len(lens) == width // 7)
    starts, lens = runs(3, 13, 16)
    covered = sorted(p for s, n in zip(starts, lens) for p in range(s, s + n))
    assert covered == [y * 16 + x for y in range(3) for x in range(13)]


@FAST
@given(
    case=conv_cases(),
    isa=st.sampled_from(ISAS),
    static=st.booleans(),
    relu=st.booleans(),
    pick=st.integers(0, 3),
    output=st.sampled_from([None, "int8", "int32"]),
)
def test_int8_direct_conv_equals_prunekit_quantized_conv_bit_for_bit(case, isa, static, relu, pick, output):
    """Both output forms of prunekit.quant.layers: float (``float32(acc) * (s_x * s_w) + bias``) and integer
    (the fixed-point requantization of prunekit.quant.rounding, into int8 or the wide int32 form)."""
    conv = make_conv(case)
    x = torch.randn(1, case["cin"], case["h"], case["w"])
    if relu:
        x = x.relu()
    scale = torch.tensor(float(x.abs().max()) / 127 * 1.05 + 1e-6) if static else None
    ref_layer = QuantizedConv2d(conv, scale)
    if static and output is not None:
        with torch.inference_mode():
            top = float(ref_layer(x).abs().max())
        s_out = (top / 127 * 0.8 + 1e-6) / (rounding.WIDE if output == "int32" else 1)  # some outputs clamp
        ref_layer.set_output(s_out, wide=output == "int32")
        assert ref_layer.integer_output
    vw = 16 if isa == "vnni512" else 8
    layer = C.PlanesQuantizedConv2d(ref_layer, nv=C.tile_options(vw)[pick], isa=isa)
    with torch.inference_mode():
        assert torch.equal(layer(x), ref_layer(x))


def _requant(consts, lo: int, hi: int) -> C.Requant:
    bias_q, mult, shift = (np.array(c, np.int64) for c in zip(*consts, strict=True))
    return C.Requant(bias_q, mult, shift, lo, hi, 0.0173)


def _epilogue_outputs(isa: str, accs: np.ndarray, rq: C.Requant, residual=None, pick=0, **kw) -> np.ndarray:
    """The float32 outputs (4, 1, n) of a 4-channel 1x1 DirectConvI8 whose epilogue alone runs on the
    whole accumulators ``accs`` (``finish``), with the float32 output as its only output. ``residual``: the
    residual's bytes (n,) int32 units (4 channels' bytes each), for the integer chain's fused add.
    ``pick``: the tile (on VNNI the integer chain's tiles of 2 and 4 vectors run the unrolled epilogue,
    ``conv_kernels._chain_epilogue``; 7 and 8 the per-row one)."""
    n = accs.shape[2]
    geom = C.ConvGeom.of(nn.Conv2d(4, 4, 1, bias=False))
    inp = L.gather(1, 1, n, *geom.args)
    out = L.planes(4, 1, n, 0, 0, (), pitch=inp.pitch)
    res = R = None
    if residual is not None:
        res = L.planes(1, 1, n, 0, 0, (), pitch=inp.pitch)
        R = res.alloc()
        R[res.col0() : res.col0() + n] = residual
    layer = C.DirectConvI8(np.zeros((4, 4, 1, 1), np.int8), np.ones(4, np.float32), None, geom, inp,
                           C.Int8Out(floats=out), nv=C.tile_options(16 if isa == "vnni512" else 8)[pick],
                           isa=isa, requant=rq, residual=res, **kw)  # fmt: skip
    F_ = out.alloc()
    layer.finish(accs, None, R, F=F_)
    got = np.empty((4, 1, n), np.float32)
    L.read(F_, out.col0(), out.per_unit * out.plane, out.pitch, 4, 1, n, got.reshape(-1).view(np.int32))
    return got


def _rule(accs: np.ndarray, rq: C.Requant, lowest: int) -> np.ndarray:
    """``float32(max(lowest, requantize_value(acc + bias_q, mult, shift, lo, hi))) * out_scale``."""
    return np.array(
        [[[max(lowest, rounding.requantize_value(int(v) + int(rq.bias_q[r]), int(rq.mult[r]),
                                                  int(rq.shift[r]), rq.lo, rq.hi))
           for v in accs[r, 0]]] for r in range(4)], np.float32,
    ) * np.float32(rq.out_scale)  # fmt: skip


@FAST
@given(
    isa=st.sampled_from(ISAS),
    acc=st.lists(st.integers(-(2**31) + 1, 2**31 - 1) | st.integers(-5000, 5000), min_size=4, max_size=40),
    consts=st.lists(
        st.tuples(st.integers(-(2**30) + 1, 2**30 - 1), st.integers(0, 2**31 - 1), st.integers(1, 62)),
        min_size=4,
        max_size=4,
    ),
    wide=st.booleans(),
)
def test_int8_epilogue_is_the_fixed_point_requantization_rule(isa, acc, consts, wide):
    """The kernels' integer epilogue computes prunekit.quant.rounding.requantize_value exactly, on any int32
    accumulator and any constants the rule allows (ties, negative values, saturation, shifts 1..62)."""
    lo, hi = (rounding.INT32_LO, rounding.INT32_HI) if wide else (rounding.INT8_LO, rounding.INT8_HI)
    rq = _requant(consts, lo, hi)
    # |acc| < 2**31 (the rule's bound); the other rows: the same values scaled and wrapped into that range
    rows = [[a if r == 0 else (a * (r + 2)) % (2**32 - 1) - (2**31 - 1) for a in acc] for r in range(4)]
    accs = np.array(rows, np.int64).reshape(4, 1, len(acc)).astype(np.int32)
    got = _epilogue_outputs(isa, accs, rq)
    assert np.array_equal(got.view(np.int32), _rule(accs, rq, lo).view(np.int32))


@settings(max_examples=60, deadline=None)
@given(
    isa=st.sampled_from(ISAS),
    acc=st.lists(st.integers(-(2**29), 2**29) | st.integers(-5000, 5000), min_size=4, max_size=40),
    consts=st.lists(
        st.tuples(st.integers(-(2**29), 2**29), st.integers(0, 2**31 - 1), st.integers(1, C.F64_MAX_SHIFT)),
        min_size=4,
        max_size=4,
    ),
    relu=st.booleans(),
    pick=st.integers(0, 3),
)
def test_the_integer_chain_requantizes_in_float64_exactly_as_the_rule(isa, acc, consts, relu, pick):
    """The integer chain's float64 requantization (conv_kernels.requantize_f64) gives requantize_value's
    integers for every accumulator and constants chain_reason admits (shifts up to F64_MAX_SHIFT: ties,
    saturation, multipliers of any size), and its ReLU is max(q, 0)."""
    rq = _requant(consts, rounding.INT8_LO, rounding.INT8_HI)
    rows = [[a if r == 0 else (a * (r + 2)) % 2**30 - 2**29 for a in acc] for r in range(4)]
    accs = np.array(rows, np.int64).reshape(4, 1, len(acc)).astype(np.int32)
    _assert_chain_is_the_rule(isa, accs, rq, relu, pick)


def _assert_chain_is_the_rule(isa: str, accs: np.ndarray, rq: C.Requant, relu: bool, pick: int) -> None:
    """The integer chain's outputs (after a ReLU when ``relu``) are the rule's integers, bit for bit."""
    clamp = (0.0, np.inf) if relu else C.NO_CLAMP
    got = _epilogue_outputs(isa, accs, rq, clamp=clamp, chain=True, pick=pick)
    want = _rule(accs, rq, 0 if relu else rounding.INT8_LO)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


@settings(max_examples=30, deadline=None)
@given(
    isa=st.sampled_from(ISAS),
    mult=st.integers(2**29, 2**31 - 1),
    shift=st.integers(30, C.F64_MAX_SHIFT),
    bias_q=st.integers(-(2**20), 2**20),
    pick=st.integers(0, 3),
    relu=st.booleans(),
)
def test_the_integer_chain_rounds_near_ties_as_the_rule(isa, mult, shift, bias_q, pick, relu):
    """The chain's requantization takes float32 where it provably rounds like the rule and float64
    otherwise (conv_kernels.requantize_chain): at every accumulator within 3 of a rounding boundary
    (``v * mult`` next to ``(k + 1/2) * 2**shift``, where float32's error could cross it), for every
    output level k, the integers are requantize_value's."""
    edges = [((2 * k + 1) << (shift - 1)) // mult - bias_q for k in range(-130, 130)]
    acc = np.array([e + d for e in edges for d in range(-3, 4)], np.int64)
    acc = np.clip(acc, -(2**31) + 1, 2**31 - 1)
    rq = _requant([(bias_q, mult, shift)] * 4, rounding.INT8_LO, rounding.INT8_HI)
    accs = np.stack([acc] * 4).reshape(4, 1, -1).astype(np.int32)
    _assert_chain_is_the_rule(isa, accs, rq, relu, pick)


@settings(max_examples=12, deadline=None)
@given(
    isa=st.sampled_from(ISAS),
    ma=st.floats(0.01, 4.0),
    mb=st.floats(0.01, 4.0),
    pick=st.integers(0, 3),
    relu=st.booleans(),
)
def test_the_integer_chain_adds_every_pair_of_int8_operands_as_the_rule(isa, ma, mb, pick, relu):
    """The chain's fused add (conv_kernels.int8_add_integers: float32 where it provably rounds like the
    rule, float64 otherwise) on all 255 x 256 pairs of a requantized output ``qa`` and a residual byte
    ``qb``: ``clamp(rshift_round(qa * Ma + qb * Mb, sh), -127, 127)``."""
    Ma, Mb, sh = rounding.add_multipliers(ma, mb)
    qa, qb = (g.ravel() for g in np.meshgrid(np.arange(-127, 128), np.arange(-128, 128), indexing="ij"))
    # qa passes the requantization unchanged (v * 2**30 / 2**30), qb is each channel's residual byte
    rq = _requant([(0, 2**30, 30)] * 4, rounding.INT8_LO, rounding.INT8_HI)
    units = sum((qb.astype(np.int64) & 255) << (8 * r) for r in range(4))
    units = units.astype(np.uint32).view(np.int32)
    add = C.IntAdd(rq.out_scale, 1.0, 0.0625, Ma, Mb, sh)  # a is the convolution at its own scale
    accs = np.stack([qa] * 4).reshape(4, 1, -1).astype(np.int32)
    clamp = (0.0, np.inf) if relu else C.NO_CLAMP  # a ReLU after the add
    got = _epilogue_outputs(isa, accs, rq, residual=units, chain=True, add=add, pick=pick, clamp=clamp)
    lowest = 0 if relu else -127
    want = [
        max(lowest, min(127, rounding.rshift_round(int(a) * Ma + int(b) * Mb, sh))) for a, b in zip(qa, qb)
    ]
    assert np.array_equal(got[0, 0] / np.float32(0.0625), np.array(want, np.float32))
    assert np.array_equal(got, np.stack([got[0]] * 4))


def test_unsupported_convolutions_say_why():
    assert "groups=4" in C.unsupported(nn.Conv2d(8, 8, 3, groups=4))
    assert "padding_mode" in C.unsupported(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    assert "padding 'same'" in C.unsupported(nn.Conv2d(8, 8, 3, padding="same"))
    assert C.unsupported(nn.Conv2d(8, 8, 3, 2, 1, 2)) is None
    with pytest.raises(Exception, match="groups"):
        C.PlanesConv2d(nn.Conv2d(8, 8, 3, groups=8))


def test_signed_int8_input_on_avx2_computes_the_same_integers_without_the_offset_path():
    """vpmaddubsw would saturate with +128-offset bytes: on AVX2 a signed input takes the exact dense path."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, 1, 1).eval()
    ref_layer = QuantizedConv2d(conv, None)
    layer = C.PlanesQuantizedConv2d(ref_layer, isa="avx2")
    x = torch.randn(1, 8, 9, 9)  # negative values: the offset path
    with torch.inference_mode():
        assert torch.equal(layer(x), ref_layer(x))
    with pytest.raises(Exception, match="VNNI"):
        geom = C.ConvGeom.of(conv)
        inp = L.gather(2, 9, 9, *geom.args)
        out = L.planes(8, 9, 9, 0, 0, (), pitch=inp.pitch)  # 8 channels: two whole groups of 4
        C.DirectConvI8(ref_layer.weight_q.numpy(), np.ones(8, np.float32), None, geom, inp,
                       C.Int8Out(floats=out), nv=4, isa="avx2", offset=128)  # fmt: skip


def test_cpu_feature_override_selects_the_avx2_paths(monkeypatch):
    import prunekit.runtime.cpu as cpu

    monkeypatch.setenv("PRUNEKIT_CPU_FEATURES", "avx2,fma")
    cpu.features.cache_clear()
    try:
        assert C.isa_name() == "avx2" and C.host_width() == 8
        conv = make_conv(dict(cin=4, cout=4, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                              sparsity=0.5, seed=1, bias=True))  # fmt: skip
        layer = C.PlanesConv2d(conv)
        assert layer.vw == 8
        x = torch.randn(1, 4, 7, 7)
        with torch.inference_mode():
            assert (layer(x) - conv(x)).abs().max() <= 1e-4 * conv(x).abs().max()
        assert C.PlanesQuantizedConv2d(QuantizedConv2d(conv, None)).isa == "avx2"
    finally:
        monkeypatch.delenv("PRUNEKIT_CPU_FEATURES")
        cpu.features.cache_clear()


def test_per_layer_modules_run_any_batch_image_by_image():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, 2, 1).eval()
    x = torch.randn(3, 4, 9, 9)
    q = QuantizedConv2d(conv, torch.tensor(0.02))
    with torch.inference_mode():
        assert (C.PlanesConv2d(conv)(x) - conv(x)).abs().max() <= 1e-4 * conv(x).abs().max()
        assert torch.equal(C.PlanesQuantizedConv2d(q)(x), q(x))
        assert torch.equal(C.PlanesQuantizedConv2d(q)(x[0]), q(x[:1])[0])
    with pytest.raises(Exception, match="expects inputs"):
        C.PlanesConv2d(conv)(torch.randn(1, 5, 9, 9))
