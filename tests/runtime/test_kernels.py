"""prunekit.runtime kernels and layers equal dense math (float32 within 1e-4 relative, int8 bit for bit)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.quant.layers import QuantizedConv2d, QuantizedLinear
from prunekit.runtime import kernels, threads
from prunekit.runtime.cpu import features
from prunekit.runtime.formats import index_dtype, int8_row_bound, pack, unpack
from prunekit.runtime.layers import (
    SparseConv2d,
    SparseLinear,
    SparseQuantizedConv2d,
    SparseQuantizedLinear,
    default_block,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = max(ref.abs().max().item(), 1e-30) if ref.numel() else 1.0
    return y.shape == ref.shape and (y - ref).abs().max().item() <= 1e-4 * scale if ref.numel() else True


def sparse_weight(out: int, inn: int, density: float, seed: int, empty_rows: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) >= density] = 0
    if empty_rows and out > 2:
        w[out // 2] = 0  # an empty CSR row
    return w


def linear(out: int, inn: int, density: float, seed: int = 0, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(inn, out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(sparse_weight(out, inn, density, seed))
    return layer


def test_import_compiles_nothing_and_loads_no_numba():
    code = "import sys, prunekit, prunekit.runtime; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_index_dtype_is_the_narrowest_unsigned():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16
    assert index_dtype(65536) == np.uint16 and index_dtype(65537) == np.uint32


@pytest.mark.parametrize("block", [None, 7, 64])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_round_trips_and_keeps_exact_nonzeros(block, density):
    w = sparse_weight(9, 70, density, 1).numpy()
    packed = pack(w, block)
    assert packed.nnz == int((w != 0).sum())
    assert packed.idx.dtype == index_dtype(packed.block)
    np.testing.assert_array_equal(unpack(packed), w)


@SETTINGS
@given(
    out=st.integers(1, 40),
    inn=st.integers(1, 300),
    batch=st.sampled_from([1, 2, 7, 8, 9, 64, 70]),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    kernel=st.sampled_from(["rows", "xt"]),
    block=st.sampled_from([None, 16]),
    seed=st.integers(0, 3),
)
def test_sparse_linear_equals_dense(out, inn, batch, density, kernel, block, seed):
    layer = linear(out, inn, density, seed, bias=seed % 2 == 0)
    x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert close(SparseLinear(layer, kernel, block)(x), layer(x))


@pytest.mark.parametrize("kernel", ["rows", "xt"])
def test_sparse_linear_any_leading_dims(kernel):
    layer, x = linear(24, 40, 0.2), torch.randn(2, 3, 5, 40)
    with torch.inference_mode():
        y = SparseLinear(layer, kernel)(x)
    assert y.shape == (2, 3, 5, 24)
    with torch.no_grad():
        assert close(y, layer(x))


def test_two_threads_split_rows_and_give_identical_results(monkeypatch):
    """Threads split output rows; each row's arithmetic is unchanged, so results are bit-identical."""
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)
    layer, x = linear(37, 50, 0.3), torch.randn(9, 50)
    conv = make_conv(CONVS[2])
    xc = torch.randn(2, conv.in_channels, 9, 11)
    modules = [
        (SparseLinear(layer, "rows"), x),
        (SparseLinear(layer, "xt", 16), x),
        (SparseConv2d(conv), xc),
        (SparseConv2d(conv, "xt-nchw"), xc),
        (SparseQuantizedLinear(QuantizedLinear(layer), "xt"), x),
        (SparseQuantizedConv2d(QuantizedConv2d(conv)), xc),
    ]
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = [m(inp) for m, inp in modules]
            torch.set_num_threads(2)
            two = [m(inp) for m, inp in modules]
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n, parts", [(0, 2), (5, 2), (40, 2), (64, 3), (1000, 7)])
def test_even_splits_cover_every_row_once(n, parts):
    cuts = threads.even_splits(n, parts)
    assert cuts[0] == 0 and cuts[-1] == n and cuts == sorted(cuts)
    assert all(c % 16 == 0 for c in cuts[1:-1])


def make_conv(spec: dict, density: float = 0.3, seed: int = 2) -> nn.Conv2d:
    spec = dict(spec)
    layer = nn.Conv2d(spec.pop("cin"), spec.pop("cout"), spec.pop("k"), **spec)
    with torch.no_grad():
        w = sparse_weight(layer.out_channels, layer.weight[0].numel(), density, seed)
        layer.weight.copy_(w.reshape(layer.weight.shape))
    return layer


CONVS = [
    dict(cin=6, cout=10, k=1),
    dict(cin=6, cout=10, k=1, stride=2, bias=False),
    dict(cin=5, cout=7, k=3, padding=1),
    dict(cin=5, cout=7, k=3, stride=2, padding=1, dilation=2),
    dict(cin=3, cout=4, k=(2, 3), padding=(1, 0), bias=False),
]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("block", [None, 8])
@pytest.mark.parametrize("kernel", ["xt", "xt-nchw"])
def test_sparse_conv_equals_dense(spec, n, block, kernel):
    layer = make_conv(spec)
    x = torch.randn(n, layer.in_channels, 9, 11, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        assert close(SparseConv2d(layer, kernel, block)(x), layer(x))
        assert close(SparseConv2d(layer)(x[0]), layer(x[0]))  # unbatched input


DIRECT_CONVS = CONVS + [
    dict(cin=5, cout=7, k=3, padding=2, dilation=2),
    dict(cin=9, cout=3, k=3, stride=2, padding=0),
    dict(cin=4, cout=5, k=(3, 1), stride=(1, 2), padding=(2, 0), bias=False),
    dict(cin=3, cout=6, k=(1, 3), dilation=(1, 2), padding=(0, 1)),
    dict(cin=7, cout=5, k=3, stride=2, dilation=2, padding=2),
]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("spec", DIRECT_CONVS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5])
def test_direct_sparse_conv_equals_dense(spec, n, density):
    layer = make_conv(spec, density=density, seed=n)
    for hw in ((9, 11), (4, 4), (8, 8)):
        x = torch.randn(n, layer.in_channels, *hw, generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            fast = SparseConv2d(layer, "direct")
            assert close(fast(x), layer(x))
            assert close(fast(x[0]), layer(x[0]))  # unbatched input
            assert close(fast(x.transpose(2, 3).contiguous().transpose(2, 3)), layer(x))  # non-contiguous


@SETTINGS
@given(
    cin=st.integers(1, 9),
    cout=st.integers(1, 9),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    n=st.sampled_from([1, 3]),
    h=st.integers(4, 10),
    w=st.integers(4, 10),
    density=st.sampled_from([0.0, 0.05, 0.3]),
    bias=st.booleans(),
)
def test_direct_sparse_conv_random_shapes(
    cin, cout, kh, kw, stride, dilation, padding, n, h, w, density, bias
):
    # the dilated kernel must fit the padded input (torch refuses the shape otherwise)
    assume(h + 2 * padding >= dilation * (kh - 1) + 1 and w + 2 * padding >= dilation * (kw - 1) + 1)
    layer = make_conv(
        dict(cin=cin, cout=cout, k=(kh, kw), stride=stride, dilation=dilation, padding=padding, bias=bias),
        density=density,
        seed=cin + cout,
    )
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(h * w))
    with torch.inference_mode():
        assert close(SparseConv2d(layer, "direct")(x), layer(x))


def test_direct_sparse_conv_all_zero_weight_gives_the_bias():
    layer = nn.Conv2d(6, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(2, 6, 5, 5)
    with torch.inference_mode():
        y = SparseConv2d(layer, "direct")(x)
        assert close(y, layer(x)) and torch.equal(y, layer.bias[None, :, None, None].expand(2, 4, 5, 5))
    with pytest.raises(PrunekitError, match="expects inputs"):
        SparseConv2d(layer, "direct")(torch.randn(1, 5, 4, 4))
    with pytest.raises(PrunekitError, match="inference-only"):
        SparseConv2d(layer, "direct")(torch.randn(1, 6, 4, 4, requires_grad=True))


def test_sparse_conv_refuses_what_it_cannot_lower():
    with pytest.raises(PrunekitError, match="grouped"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(PrunekitError, match="padding_mode"):
        SparseConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


# -- int8 -----------------------------------------------------------------------------------------------
def int8_inputs(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    ties = torch.randint(-300, 300, shape, generator=g).to(torch.float32) / 2  # exact .5 ties
    return [x, ties, torch.zeros(shape), x.clamp(min=0)]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kernel", ["rows", "xt", "dense"])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_int8_linear_is_bit_exact(kernel, static, bias):
    layer = linear(33, 70, 0.2, 3, bias=bias)
    ref = QuantizedLinear(layer, act_scale=torch.tensor(0.05) if static else None)
    fast = SparseQuantizedLinear(ref, kernel)
    for batch in (1, 9):
        for x in int8_inputs((batch, 70), batch):
            with torch.inference_mode():
                assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("kernel", ["xt", "xt-nchw", "dense"])
@pytest.mark.parametrize("spec", CONVS[1:4])
def test_sparse_int8_conv_is_bit_exact(spec, kernel):
    ref = QuantizedConv2d(make_conv(spec))
    fast = SparseQuantizedConv2d(ref, kernel)
    for n in (1, 2):
        for x in int8_inputs((n, ref.in_channels, 7, 8), n):
            with torch.no_grad():
                assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("kernel", ["rows", "xt", "dense"])
def test_sparse_int8_linear_integer_output_is_bit_exact(kernel, wide):
    """The integer output form (fixed-point requantization, prunekit.quant.rounding) in the kernels."""
    layer = linear(33, 70, 0.2, 3)
    ref = QuantizedLinear(layer, act_scale=torch.tensor(0.05))
    ref.set_output(torch.tensor(0.02 / (65536 if wide else 1)), wide=wide)  # small: saturation is tested
    fast = SparseQuantizedLinear(ref, kernel)
    for batch in (1, 9):
        for x in int8_inputs((batch, 70), batch):
            with torch.inference_mode():
                assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("vnni", [False] + ([True] if features().vnni else []))
@pytest.mark.parametrize("form", ["float", "int8", "int32"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_classifier_on_the_int8_gemv_is_bit_exact(vnni, form, static, bias):
    """A QuantizedLinear at batch 1 on the exact int8 block kernels (GemvLinear.from_quantized): its own
    weight_q, its activation rounding (static or dynamic), each of its output forms; any other batch runs
    the module itself."""
    from prunekit.runtime.gemv import GemvLinear

    layer = linear(37, 70, 0.6, 4, bias=bias)  # 37 rows: padding rows in the 16-row blocks
    ref = QuantizedLinear(layer, act_scale=torch.tensor(0.05) if static or form != "float" else None)
    if form != "float":  # small scales: saturation is reached
        ref.set_output(torch.tensor(0.02 / (65536 if form == "int32" else 1)), wide=form == "int32")
    fast = GemvLinear.from_quantized(ref, vnni=vnni)
    assert fast.exact and fast.packed.layout == ("block-vnni" if vnni else "block")
    assert np.array_equal(
        fast.packed.effective.numpy(), (ref.weight_q.to(torch.float32) * ref.weight_scale[:, None]).numpy()
    )  # the layer's own integers, not a second rounding of them
    for batch in (1, 9):
        for x in int8_inputs((batch, 70), batch):
            with torch.inference_mode():
                y = fast(x)
                assert torch.equal(y, ref(x)) and torch.equal(y, fast.reference(x))
        x64 = int8_inputs((1, 70), 3)[0].double()  # not float32: the layer itself runs
        assert torch.equal(fast(x64), ref(x64))
    if form == "int8":
        assert (torch.round(y / ref.out_scale).abs() == 127).any()
    with pytest.raises(PrunekitError, match="QuantizedLinear"):
        GemvLinear.from_quantized(layer)


def test_compile_offers_the_int8_gemv_to_an_int8_classifier_at_batch_1():
    from prunekit.quant.ptq import quantize_model
    from prunekit.runtime import compile as rt_compile
    from prunekit.runtime.compiler import _candidates

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    calib = [torch.randn(1, 48) for _ in range(3)]
    q = quantize_model(model, activations="static", calibration=calib, classifier=True)
    head = q[2]
    assert isinstance(head, QuantizedLinear)
    offered, _ = _candidates(head, torch.randn(1, 64))
    assert "gemv:block16/q8" in offered
    assert "gemv:block16/q8" not in _candidates(head, torch.randn(4, 64))[0]  # one vector only
    x = torch.randn(1, 48)
    with torch.inference_mode():
        assert torch.equal(rt_compile(q, x, budget_s=0.005, min_reps=2, max_reps=3)(x), q(x))


@pytest.mark.parametrize("kernel", ["xt", "xt-nchw", "dense"])
@pytest.mark.parametrize("spec", CONVS[1:4])
def test_sparse_int8_conv_integer_output_is_bit_exact(spec, kernel):
    ref = QuantizedConv2d(make_conv(spec), act_scale=torch.tensor(0.03))
    ref.set_output(torch.tensor(0.05))
    fast = SparseQuantizedConv2d(ref, kernel)
    for n in (1, 2):
        for x in int8_inputs((n, ref.in_channels, 7, 8), n):
            with torch.no_grad():
                y = ref(x)
                assert torch.equal(fast(x), y)
    q = torch.round(y / ref.out_scale)
    assert q.abs().max() == 127 and torch.equal(q * ref.out_scale, y)  # saturated, on the int8 grid


def test_int8_quantization_matches_the_reference_rounding():
    from prunekit.quant.rounding import quantize_activation

    g = torch.Generator().manual_seed(0)
    for x in [
        torch.randint(-300, 300, (5000,), generator=g) / 2,
        torch.randn(5000, generator=g) * 10,
        torch.randn(7, generator=g) * 1e-30,
        torch.zeros(4),
    ]:
        xq_ref, s_ref = quantize_activation(x)
        s = np.float32(kernels.dynamic_scale(x.numpy()))
        out = np.empty_like(x.numpy())
        kernels.quantize_into(x.numpy(), s, out)
        assert np.float32(s) == s_ref.item()
        np.testing.assert_array_equal(out, xq_ref.numpy().astype(np.float32))


def test_int8_layers_refuse_rows_whose_sums_could_round():
    layer = nn.Linear(1100, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # 1100 * 127 * 127 > 2**24
    ref = QuantizedLinear(layer)
    assert int8_row_bound(ref.weight_q.numpy()) >= 2**24
    with pytest.raises(PrunekitError, match="2\\*\\*24"):
        SparseQuantizedLinear(ref)


# -- clear errors -----------------------------------------------------------------------------------------
def test_layers_refuse_training_and_bad_inputs():
    fast = SparseLinear(linear(4, 6, 0.5))
    with pytest.raises(PrunekitError, match="inference-only"):
        fast(torch.randn(2, 6, requires_grad=True))
    with pytest.raises(PrunekitError, match="expects inputs"):
        fast(torch.randn(2, 5))
    with pytest.raises(PrunekitError, match="floating-point"):
        fast(torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(PrunekitError, match="unknown kernel"):
        SparseLinear(linear(4, 6, 0.5), "csc")
    y = fast(torch.randn(2, 6))  # grad mode on but nothing requires grad: fine
    assert not y.requires_grad


def test_numba_cache_failure_falls_back_to_memory():
    scope: dict = {}
    exec("def twice(a):\n    return 2 * a\n", scope)  # no source file: numba cannot cache it
    assert kernels._jit()(scope["twice"])(21) == 42


def test_default_block_only_splits_wide_inputs():
    assert default_block(256, 64) is None and default_block(512, 8) is None
    assert default_block(3072, 64) == 256 and default_block(3072, 8) == 512


# -- the xt kernel's fused bias and the Linear -> activation -> Linear chain ------------------------------
@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("p", [1, 7, 8, 9, 64, 72, 130])
def test_xt_bias_is_bit_identical_to_a_separate_add(block, p):
    from prunekit.runtime.layers import _xt

    w = pack(sparse_weight(37, 70, 0.3, 4).numpy(), block)  # with an empty row
    g = torch.Generator().manual_seed(p)
    xT, bias = torch.randn(70, p, generator=g).numpy(), torch.randn(37, generator=g).numpy()
    np.testing.assert_array_equal(_xt(w, xT, bias), _xt(w, xT) + bias[:, None])


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.Tanh()])
@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_chain_equals_the_unfused_layers(act, block, bias):
    from prunekit.runtime.layers import SparseLinearChain

    first, second = linear(45, 33, 0.3, 5, bias=bias), linear(19, 45, 0.2, 6, bias=bias)  # empty rows
    a, b = SparseLinear(first, "xt", block), SparseLinear(second, "xt", block)
    chain = SparseLinearChain(a, act, b)
    for shape in [(1, 33), (9, 33), (64, 33), (70, 33), (2, 5, 33)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.inference_mode():
            y = chain(x)
            assert y.shape == (*shape[:-1], 19)
            assert close(y, b(act(a(x)))) and close(y, second(act(first(x))))


def test_linear_chain_refuses_what_it_cannot_chain():
    from prunekit.runtime.layers import SparseLinearChain

    a, b = SparseLinear(linear(8, 6, 0.5), "xt"), SparseLinear(linear(4, 8, 0.5), "xt")
    with pytest.raises(PrunekitError, match="xt"):
        SparseLinearChain(SparseLinear(linear(8, 6, 0.5), "rows"), nn.ReLU(), b)
    with pytest.raises(PrunekitError, match="sizes"):
        SparseLinearChain(a, nn.ReLU(), SparseLinear(linear(4, 9, 0.5), "xt"))
    with pytest.raises(PrunekitError, match="transposed layout"):
        SparseLinearChain(a, nn.Softmax(dim=-1), b)
    with pytest.raises(PrunekitError, match="inference-only"):
        SparseLinearChain(a, nn.ReLU(), b)(torch.randn(2, 6, requires_grad=True))


def test_gelu_kernel_is_within_float32_rounding_of_the_exact_erf(monkeypatch):
    from prunekit.runtime.layers import _gelu

    g = torch.Generator().manual_seed(8)
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6.0, -6.0, 8.5, -8.5, 30.0, -30.0, 1e30, -1e30])
    x = torch.cat([torch.randn(3001, generator=g) * 4, torch.linspace(-10, 10, 2001), extremes])
    ref = torch.nn.functional.gelu(x.double())
    a = x.numpy().copy()
    _gelu(a)
    err = (torch.from_numpy(a).double() - ref).abs()
    assert (err <= 2e-6 * ref.abs().clamp(min=1.0)).all(), err.max()
    monkeypatch.setattr(threads, "MIN_PARALLEL_WORK", 0)  # split over two threads: the same values
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        b = x.numpy().copy()
        _gelu(b)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(a, b)


def test_gelu_kernel_gives_the_limits_at_infinities_and_keeps_nan():
    """GELU(x) = x Phi(x): +inf at +inf, 0 at -inf (the limit), NaN at NaN. Stated, not read off torch,
    whose own GELU gives NaN or inf at +inf depending on the CPU's instruction set."""
    from prunekit.runtime.layers import _gelu

    a = np.array([np.inf, -np.inf, np.nan, 3.0, -30.0], dtype=np.float32)
    _gelu(a)
    assert a[0] == np.inf and a[1] == 0.0 and np.isnan(a[2])
    np.testing.assert_allclose(a[3], 3.0 * 0.5 * (1 + math.erf(3.0 / math.sqrt(2))), rtol=1e-6)
    assert a[4] == 0.0 or abs(a[4]) < 1e-30  # -30 Phi(-30) underflows float32
