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
