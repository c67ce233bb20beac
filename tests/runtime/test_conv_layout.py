"""runtime.conv_layout glue kernels against their definitions, element by element."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.runtime import conv_layout as L


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    units=st.integers(1, 3),
    extra=st.integers(0, 1),
    h=st.integers(1, 13),
    w=st.integers(1, 13),
    k=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pad=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    dil=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    seed=st.integers(0, 2**16),
)
def test_fill_puts_every_source_unit_where_the_gather_layout_says(
    units, extra, h, w, k, stride, pad, dil, seed
):
    """Plane (phase a, column c), row r, column x holds source unit ``[u, r*sh + a - rp, x*sw + c]``, or
    ``zero`` outside the source (units past the source's included), for every row of the plane."""
    (kh, kw), (dh, dw) = k, dil
    if (h + 2 * pad[0] - dh * (kh - 1) - 1) < 0 or (w + 2 * pad[1] - dw * (kw - 1) - 1) < 0:
        return  # no output position
    lay = L.gather(units + extra, h, w, k, stride, pad, dil)
    src = np.random.default_rng(seed).integers(1, 2**31 - 1, size=units * h * w).astype(np.int32)
    zero = np.int32(-7)
    dst = lay.alloc()
    L.fill(src, 0, h * w, w, h, w, units, dst, L.fill_geo(lay), zero)
    s3 = src.reshape(units, h, w)
    for u in range(units + extra):
        for a in lay.phases:
            for c in lay.cols:
                base = lay.index(u, a, c) * lay.plane
                got = dst[base : base + lay.rows * lay.pitch].reshape(lay.rows, lay.pitch)
                want = np.full_like(got, zero)
                for r in range(lay.rows):
                    sr = r * lay.row_stride + a - lay.row_pad
                    if u >= units or not 0 <= sr < h:
                        continue
                    for x in range(lay.pitch):
                        sc = x * lay.col_stride + c
                        if 0 <= sc < w:
                            want[r, x] = s3[u, sr, sc]
                assert np.array_equal(got, want), (u, a, c)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    units=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    wider=st.integers(0, 9),
    stride=st.integers(1, 3),
    shifts=st.sampled_from([(0,), (-1, 0, 1), (0, 2)]),
    seed=st.integers(0, 2**16),
)
def test_zero_padded_3x3_max_pool_equals_its_definition(units, h, w, wider, stride, shifts, seed):
    """``maxpool_bytes_3x3`` on non-negative bytes in planes whose padding is zero: every output plane
    holds, at output ``(oy, ox)`` shifted by its column shift, the bytewise max over the ``3 x 3`` window
    at ``(oy * s - 1, ox * s - 1)`` of the input positions inside the image; nothing else of the output
    buffer changes."""
    src_l = L.planes(units, h, w, 1, 1, (), pitch=w + wider)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dst_l = L.planes(units, ho, wo, 1, 1, shifts)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 128, size=(units, h, w, 4)).astype(np.uint8)
    sbuf = src_l.alloc()
    s8 = sbuf.view(np.uint8)
    for u in range(units):
        base = (src_l.col0() + u * src_l.per_unit * src_l.plane) * 4
        for r in range(h):
            s8[base + r * src_l.pitch * 4 : base + (r * src_l.pitch + w) * 4] = x[u, r].reshape(-1)
    dbuf = dst_l.alloc()
    dbuf[:] = rng.integers(-(2**31), 2**31 - 1, size=dbuf.shape, dtype=np.int64).astype(np.int32)
    before = dbuf.copy()
    yoffs = L.store_plan(dst_l, 1, 1)[0]
    scratch = np.empty(src_l.pitch + wo // 2 + 8, np.uint64)
    L.maxpool_bytes_3x3(s8, src_l.col0(), src_l.per_unit * src_l.plane, src_l.pitch, 0, units, h, w, stride,
                        dbuf.view(np.uint8), yoffs, np.array(dst_l.cols, np.int64),
                        dst_l.per_unit * dst_l.plane, dst_l.pitch, ho, wo, scratch)  # fmt: skip
    want = before.copy().view(np.uint8)
    for u in range(units):
        for oy in range(ho):
            rows = slice(max(oy * stride - 1, 0), min(oy * stride + 2, h))
            for ox in range(wo):
                m = x[u, rows, max(ox * stride - 1, 0) : min(ox * stride + 2, w)].max(axis=(0, 1))
                for d in dst_l.cols:
                    if 0 <= ox - d < dst_l.pitch:  # the column this plane's shifted store lands in
                        at = (
                            dst_l.index(u, 0, d) * dst_l.plane + (dst_l.row_pad + oy) * dst_l.pitch + ox - d
                        ) * 4
                        want[at : at + 4] = m
    assert np.array_equal(dbuf.view(np.uint8), want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.integers(1, 13),
    h=st.integers(1, 6),
    w=st.integers(1, 9),
    extra=st.integers(0, 3),
    offset=st.sampled_from([0, 128]),
    seed=st.integers(0, 2**16),
)
def test_global_pool_bytes_sums_each_channels_integers_then_requantizes(c, h, w, extra, offset, seed):
    """Channel ``ch`` is byte ``ch % 4`` of unit ``ch // 4``'s words; signed bytes as int8, +128-offset
    bytes minus 128; then ``float32(requantize_value(sum, mult, sh, -127, 127)) * s_out``."""
    from prunekit.quant.rounding import requantize_value

    rng = np.random.default_rng(seed)
    q, s_off = w + extra, 3
    units = -(-c // 4)
    s_cstride = (h + 1) * q
    src = rng.integers(0, 256, 4 * (s_off + units * s_cstride + q), dtype=np.uint8)
    mult, sh, s_out = 1 + int(rng.integers(0, 2**20)), 20, np.float32(0.125)
    out = np.empty(c, np.float32)
    L.global_pool_bytes(src, s_off, s_cstride, q, c, h, w, offset, mult, sh, s_out, out)
    words = src.view(np.uint32)
    for ch in range(c):
        total = 0
        for r in range(h):
            for x in range(w):
                byte = (int(words[s_off + (ch // 4) * s_cstride + r * q + x]) >> (8 * (ch % 4))) & 255
                total += byte - offset if offset else (byte - 256 if byte >= 128 else byte)
        assert out[ch] == np.float32(requantize_value(total, mult, sh, -127, 127)) * s_out
