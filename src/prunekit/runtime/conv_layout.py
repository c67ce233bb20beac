"""The aligned-plane activation layout of the direct sparse convolutions, and the glue kernels around it.

A :class:`Layout` stores an activation of ``units`` channels (float32: one channel per unit; int8: four
channels packed in one 32-bit unit) as planes of ``plane`` elements, one per (unit, row phase ``a``,
column offset ``c``)::

    plane(u, a, c)[r * pitch + x] = X[u, r * row_stride + a - row_pad, x * col_stride + c]

(zero outside X). ``pitch`` is a multiple of 8 (of 4 for int8 on VNNI: :func:`pitch_for`) and every
plane starts on a 64-byte boundary, so a convolution tap ``(i, j)`` of the output tile at position ``p = oy
* pitch + ox`` is one vector load at ``plane(u, a_i, c_j) + roff_i * pitch + p``, aligned to 32 bytes at
pitch 8: the layout holds one column-shifted copy of the input per kernel column instead of shifting the
loads (Park et al. 2017 read unaligned; aligned float32 loads measured 35 -> 50 GMAC/s on Zen 4). Two
kinds:

* **planes** (``row_stride = col_stride = 1``, one phase): what a convolution writes and what a stride-1
  convolution reads directly; ``cols`` are the column shifts its consumers need (with ``0`` always there,
  for residual adds and exits), ``row_pad`` the zero rows on top (``bottom`` below).
* **gather**: built for one strided (or entry) convolution from a planes tensor or an NCHW array: the
  stride's row phases and column picks done once, so the kernel runs the same stride-1 loop.

All buffers carry a guard of :data:`GUARD` units before and :data:`SLACK` after, which the kernels' tile
overrun and shifted stores may touch (with zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.quant.rounding import requantize_value
from prunekit.runtime.conv_kernels import T_MAX, _jit

GUARD = 64  # units before the first plane (shifted stores may land up to a few units before it)
SLACK = T_MAX + 64  # units after the last plane
ZERO_OFFSET = np.int32(-2139062144)  # 0x80808080: four bytes of value 0 in the +128 (u8) encoding


def roundup(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass(frozen=True)
class Layout:
    units: int
    pitch: int
    rows: int
    row_stride: int
    col_stride: int
    row_pad: int
    phases: tuple[int, ...]
    cols: tuple[int, ...]
    height: int  # valid rows / columns of the positions it describes (for masks and exits)
    width: int

    @property
    def plane(self) -> int:
        # a whole tile may start at the last row: T_MAX positions of slack, and two rows for shifted stores
        return roundup(self.rows * self.pitch + 2 * self.pitch + T_MAX + 32, 16)

    @property
    def per_unit(self) -> int:
        return len(self.phases) * len(self.cols)

    def covers(self, shift: int) -> bool:
        """Whether a read of column ``x + shift`` can use the unshifted plane: a planes layout (stride 1)
        whose rows end in at least ``|shift|`` zero columns (``pitch - width``). Left of column 0 such a
        read lands on the previous row's zero columns (the zero pad row above row 0), right of the last
        column on its own: the zeros a stored shifted copy would hold."""
        return self.row_stride == 1 and self.col_stride == 1 and abs(shift) <= self.pitch - self.width

    def has_shift(self, shift: int) -> bool:
        """A copy shifted by ``shift`` is stored, or the unshifted plane serves it (:meth:`covers`)."""
        return shift in self.cols or self.covers(shift)

    @property
    def size(self) -> int:
        return self.units * self.per_unit * self.plane

    def index(self, u: int, a: int, c: int) -> int:
        return (u * len(self.phases) + self.phases.index(a)) * len(self.cols) + self.cols.index(c)

    def col0(self) -> int:
        """Offset of unit 0's plane ``(phase 0, column 0)`` at its first valid row."""
        return self.index(0, 0, 0) * self.plane + self.row_pad * self.pitch

    def alloc(self, fill: int = 0) -> np.ndarray:
        """A zeroed (or ``fill``-ed int32) buffer, 64-byte aligned at the first plane, as int32 units."""
        total = self.size + GUARD + SLACK
        raw = np.zeros(total + 16, dtype=np.int32)
        start = (-raw.ctypes.data % 64) // 4
        buf = raw[start : start + total]
        if fill:
            buf[:] = fill
        return buf[GUARD:]

    def geo(self) -> np.ndarray:
        """int64 geometry for the glue kernels."""
        return np.array(
            [
                self.units,
                self.pitch,
                self.rows,
                self.row_stride,
                self.col_stride,
                self.row_pad,
                self.plane,
                self.height,
                self.width,
                len(self.phases),
                len(self.cols),
            ],
            dtype=np.int64,
        )


def pitch_for(width: int, tight: bool = False) -> int:
    """The row pitch of a layout ``width`` positions wide: a multiple of 8 (32-byte aligned rows: the
    float32 kernels' loads never split a cache line), of 4 when ``tight`` (int8 segments on VNNI, whose
    kernels measured faster on the tighter pitch despite loads that split cache lines: 28-wide maps, 28
    against 32 positions a row, a 64-channel 3x3 layer 177 -> 161 us on AMD EPYC Zen 4; the AVX2 path,
    not measured on AVX2 hardware, keeps 8)."""
    return roundup(max(width, 1), 4 if tight else 8)


def planes(units: int, height: int, width: int, top: int, bottom: int, shifts, pitch: int | None = None):
    """A planes layout (what convolutions write): a copy of the map per column shift its readers need
    (``shifts``; ``0`` always), except those the zero columns at the end of each row cover
    (:meth:`Layout.covers`: ``|shift| <= pitch - width``): e.g. a 14-wide map at pitch 16 is read by a
    3x3 convolution from one plane, not three, a third of the bytes written and held."""
    q = pitch or pitch_for(width)
    cols = tuple(sorted({d for d in shifts if abs(d) > q - width} | {0}))
    top = max(top, 1)  # a row above, for stores shifted right of the first row's first column
    return Layout(units, q, top + height + bottom + 1, 1, 1, top, (0,), cols, height, width)


def conv_out_hw(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def gather(units: int, h: int, w: int, kernel, stride, padding, dilation, pitch: int | None = None) -> Layout:
    """The input layout built for one convolution: its stride's row phases and column picks (``pitch``:
    its output's, :func:`pitch_for` of the output width by default)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = conv_out_hw(h, w, kernel, stride, padding, dilation)
    phases = tuple(sorted({(i * dh) % sh for i in range(kh)}))
    cols = tuple(j * dw - pw for j in range(kw))
    rows = ho + max((i * dh) // sh for i in range(kh)) + 1
    return Layout(units, pitch or pitch_for(wo), rows, sh, sw, ph, phases, cols, ho, wo)


def gather_serves(layout: Layout, kernel, stride, padding, dilation, ho: int, pitch: int) -> bool:
    """Whether a gather built for one convolution holds every tap of another one on the same input (its
    :func:`tap_offsets` land in planes that exist, on rows that exist), with output ``ho`` rows at
    ``pitch``: a ResNet downsample (1x1, stride 2) reads the planes of its block's 3x3 stride-2 gather."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if (layout.row_stride, layout.col_stride, layout.pitch) != (sh, sw, pitch):
        return False
    for i in range(kh):
        need = i * dh - ph + layout.row_pad
        if need < 0 or need % sh not in layout.phases or need // sh + ho > layout.rows:
            return False
    return all(j * dw - pw in layout.cols for j in range(kw))


def reads_directly(layout: Layout, kernel, stride, padding, dilation) -> bool:
    """Whether a convolution can read ``layout`` (a planes tensor) with no gather: stride 1, every column
    shift and row it needs present, and an output no wider than the pitch."""
    (kh, kw), (ph, pw), (dh, dw) = kernel, padding, dilation
    if tuple(stride) != (1, 1) or layout.row_stride != 1 or layout.col_stride != 1:
        return False
    ho, wo = conv_out_hw(layout.height, layout.width, kernel, stride, padding, dilation)
    if ho < 1 or wo < 1 or wo > layout.pitch or ph > layout.row_pad:
        return False
    if not all(layout.has_shift(j * dw - pw) for j in range(kw)):
        return False
    # the lowest row read: oy = ho - 1, i = kh - 1
    return (ho - 1) + (kh - 1) * dh - ph + layout.row_pad < layout.rows


def tap_offsets(
    layout: Layout, kernel, stride, padding, dilation, units: np.ndarray, ti: np.ndarray, tj: np.ndarray
):
    """Each tap's load offset (from the buffer start, before the tile position ``p``) for a convolution
    reading ``layout`` (a gather made for it, or a planes tensor it reads directly)."""
    (ph, pw), (dh, dw) = padding, dilation
    s, rp = layout.row_stride, layout.row_pad
    need = ti * dh - ph + rp  # layout row (times the stride) of output row 0
    phase = need % s
    roff = need // s
    a_idx = np.searchsorted(np.array(layout.phases), phase)
    shift = np.broadcast_to(np.asarray(tj * dw - pw, dtype=np.int64), np.shape(tj))
    cols = np.array(layout.cols)
    stored = np.isin(shift, cols)
    if not all(layout.covers(int(d)) for d in np.unique(shift[~stored])):
        raise ValueError(f"layout stores column shifts {layout.cols}; {sorted(set(shift.flat))} are read")
    unshifted = layout.cols.index(0) if 0 in layout.cols else 0  # planes layouts always store shift 0
    c_idx = np.where(stored, np.searchsorted(cols, shift), unshifted)
    plane = (units * len(layout.phases) + a_idx) * len(layout.cols) + c_idx
    extra = np.where(stored, 0, shift)  # the unshifted plane, read ``shift`` columns over
    return plane.astype(np.int64) * layout.plane + roff.astype(np.int64) * layout.pitch + extra


def store_plan(out: Layout, tile: int, ntiles: int) -> tuple[np.ndarray, np.ndarray]:
    """Where a convolution's epilogue stores position ``p`` of its output into the planes layout ``out``
    (same pitch as its input): ``yoffs[s] = s * plane + row_pad * pitch - shift_s`` from the unit's first
    plane, and the 0/1 masks ``M[s * ml + p]`` (``ml = ntiles * tile``) that zero padding lanes and lanes
    whose shifted store would wrap into the neighbouring row."""
    q = out.pitch
    ml = ntiles * tile
    p = np.arange(ml)
    oy, ox = p // q, p % q
    valid = (oy < out.height) & (ox < out.width)
    yoffs, masks = [], []
    for s, d in enumerate(out.cols):
        yoffs.append(s * out.plane + out.row_pad * q - d)
        masks.append(valid & (ox - d >= 0) & (ox - d < q))
    return np.array(yoffs, dtype=np.int64), np.concatenate(masks)


# -- glue kernels: int32 units (float32 activations travel as their bits) -----------------------------------
@_jit()
def fill(src, s_off, s_cstride, s_rstride, s_h, s_w, s_units, dst, geo, zero):
    """Fill every plane of the layout ``geo`` from a source array of ``s_units`` units (an NCHW array:
    ``s_cstride = H*W``, ``s_rstride = W``; or a planes tensor's column-0 planes), ``zero`` outside the
    source (units past ``s_units`` included).

    Loops over ``range`` on slices taken once per row: the index is provably non-negative, so numba's
    negative-index check folds away and LLVM vectorises the copies (slice assignments cost more in numba's
    generic setitem than their copy: 3x on the stem). A strided layout (``sw > 1``; the stem: 7 column
    planes at stride 2) splits each source row into its ``sw`` column parities once; every column plane is
    then a contiguous copy of one of them."""
    units, q, rows, sh, sw, rp, plane = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    npa, ncol = geo[9], geo[10]
    cols = geo[11 : 11 + ncol]
    phases = geo[11 + ncol : 11 + ncol + npa]
    los, his = np.empty(ncol, np.int64), np.empty(ncol, np.int64)
    for ci in range(ncol):  # the plane columns whose source is inside
        c0 = cols[ci]
        los[ci] = min(max(0, (-c0 + sw - 1) // sw), q)
        his[ci] = max(min(q, (s_w - c0 + sw - 1) // sw), los[ci])
    pw = (s_w + sw - 1) // sw
    par = np.empty(sw * pw, dst.dtype)
    for u in range(units):
        for ai in range(npa):
            for r in range(rows):
                sr = r * sh + phases[ai] - rp
                inside = 0 <= sr < s_h and u < s_units
                start = s_off + u * s_cstride + sr * s_rstride
                if inside and sw > 1:
                    srow = src[start : start + s_w]
                    for p in range(sw):
                        n = (s_w - p + sw - 1) // sw
                        pr = par[p * pw : p * pw + n]
                        for x in range(n):
                            pr[x] = srow[x * sw + p]
                for ci in range(ncol):
                    d = ((u * npa + ai) * ncol + ci) * plane + r * q
                    row = dst[d : d + q]
                    lo, hi = los[ci], his[ci]
                    if not inside or hi == lo:
                        for x in range(q):
                            row[x] = zero
                        continue
                    c0 = cols[ci]
                    for x in range(lo):
                        row[x] = zero
                    if sw == 1:
                        part = src[start + c0 + lo : start + c0 + hi]
                    else:  # column x * sw + c0: parity c0 % sw, index x + c0 // sw
                        b = (c0 % sw) * pw + c0 // sw
                        part = par[b + lo : b + hi]
                    mid = row[lo:hi]
                    for x in range(hi - lo):
                        mid[x] = part[x]
                    for x in range(hi, q):
                        row[x] = zero


def fill_geo(layout: Layout) -> np.ndarray:
    return np.concatenate([layout.geo(), np.array(layout.cols, np.int64), np.array(layout.phases, np.int64)])


@_jit()
def read(src, s_off, s_cstride, q, units, h, w, out):
    """``out[u, r, x] = src[s_off + u * s_cstride + r * q + x]``: a planes tensor's column-0 planes back to
    a C-ordered (units, h, w) array of units."""
    for u in range(units):
        for r in range(h):
            b = s_off + u * s_cstride + r * q
            o = (u * h + r) * w
            out[o : o + w] = src[b : b + w]


def read_nchw(buf: np.ndarray, layout: Layout, channels: int) -> np.ndarray:
    """A float32 planes tensor (``buf`` laid out as ``layout``) as a (1, channels, height, width) array."""
    y = np.empty((1, channels, layout.height, layout.width), np.float32)
    read(
        buf,
        layout.col0(),
        layout.per_unit * layout.plane,
        layout.pitch,
        channels,
        layout.height,
        layout.width,
        y.reshape(-1).view(np.int32),
    )
    return y


@_jit(fastmath=False)
def quantize_pack(x, c, hw, s, offset, out):
    """Float32 activations (c, hw) -> int8 ``clamp(round_half_even(x / s), -127, 127)`` (+ ``offset``:
    0, or 128 for the u8 encoding), four channels per int32 unit: ``out`` (ceil(c / 4), hw). A channel at a
    time over contiguous slices (vectorised; the division stays a division: no fast-math)."""
    groups = (c + 3) // 4
    lo, hi = np.float32(-127.0), np.float32(127.0)
    for g in range(groups):
        o = out[g * hw : (g + 1) * hw]
        for p in range(hw):
            o[p] = 0
        for b in range(4):
            ch = 4 * g + b
            if ch < c:
                xs = x[ch * hw : (ch + 1) * hw]
                for p in range(hw):
                    q = min(max(np.rint(xs[p] / s), lo), hi)
                    o[p] |= ((np.int32(q) + offset) & 255) << (8 * b)
            else:  # a padding channel: the encoding of 0
                pad = (offset & 255) << (8 * b)
                for p in range(hw):
                    o[p] |= pad


@_jit()
def _max_into(a, b, n):
    """``a[x] = max(a[x], b[x])`` for ``x < n`` (a NaN in ``b`` wins, as in torch's max pool). A loop over
    ``range`` on slices: its index is provably non-negative, so numba's negative-index check folds away and
    LLVM vectorises it (a ``np.maximum`` call per row cost 5x more in dispatch than its work)."""
    for x in range(n):
        v, o = b[x], a[x]
        a[x] = v if v > o or v != v else o  # stored always: a conditional store kept the loop scalar


@_jit()
def maxpool(
    src,
    s_off,
    s_cstride,
    q_in,
    u0,
    u1,
    epu,
    h,
    w,
    k,
    st,
    pad,
    dst,
    yoffs,
    shifts,
    ystride,
    qo,
    ho,
    wo,
    rowmax,
):
    """Max pool ``k x k``, stride ``st``, padding ``pad`` (padding never wins: it is skipped, as torch does)
    from a planes tensor into every shifted plane of an output planes layout. Works on elements: float32
    (``epu = 1`` element per unit) or bytes (``epu = 4``, uint8 for non-negative or +128-encoded values,
    int8 otherwise). Offsets are in units; ``yoffs[s]`` (from a unit's first plane, at output row 0,
    shift included) and ``shifts[s]`` describe the output planes, ``ystride`` the units. Units
    ``[u0, u1)``; ``rowmax``: scratch of at least ``(2 w + wo) * epu`` elements (one per thread).

    Per output row: the max over the window's rows, then over the window's columns at every column (``k``
    shifted passes), then the output columns picked at the stride (a unit at a time: bytes move as one
    32-bit word), and one copy per output plane."""
    ns = yoffs.shape[0]
    we = w * epu
    row = rowmax[:we]
    cm = rowmax[we : 2 * we]
    out = rowmax[2 * we : 2 * we + wo * epu]
    for u in range(u0, u1):
        ub = (s_off + u * s_cstride) * epu
        for oy in range(ho):
            r0 = max(oy * st - pad, 0)
            r1 = min(oy * st - pad + k, h)
            b = ub + r0 * q_in * epu
            first = src[b : b + we]
            for x in range(we):
                row[x] = first[x]
            for r in range(r0 + 1, r1):
                b = ub + r * q_in * epu
                _max_into(row, src[b : b + we], we)
            for x in range(we):
                cm[x] = row[x]
            for j in range(k):  # cm[x] = max over the window's columns x + j - pad that are inside
                d = j - pad
                if d == 0:
                    continue
                lo, hi = max(0, -d), min(w, w - d)
                if hi > lo:
                    _max_into(cm[lo * epu : hi * epu], row[(lo + d) * epu : (hi + d) * epu], (hi - lo) * epu)
            if epu == 4:  # bytes: the 4 channels of a column as one word
                c32, o32 = cm.view(np.int32), out.view(np.int32)
                for ox in range(wo):
                    o32[ox] = c32[min(ox * st, w - 1)]
            else:
                for ox in range(wo):
                    out[ox] = cm[min(ox * st, w - 1)]
            for ox in range((w + st - 1) // st, wo):  # a window past the last column: its inside columns only
                for e in range(epu):
                    m = row[(w - 1) * epu + e]
                    for c in range(max(ox * st - pad, 0), w):
                        m = max(m, row[c * epu + e])
                    out[ox * epu + e] = m
            for s in range(ns):
                d = shifts[s]
                lo, hi = max(0, d), min(wo, qo + d)  # output columns whose shifted column is in [0, qo)
                base = (u * ystride + yoffs[s] + oy * qo) * epu
                dd, oo = dst[base + lo * epu : base + hi * epu], out[lo * epu : hi * epu]
                for x in range((hi - lo) * epu):
                    dd[x] = oo[x]


@_jit()
def maxpool_bytes_3x3(
    src, s_off, s_cstride, q_in, u0, u1, h, w, st, dst, yoffs, shifts, ystride, qo, ho, wo, scratch
):
    """:func:`maxpool` for a ``3 x 3`` window with padding 1 on non-negative bytes (uint8, offset 0: the
    zero padding rows of a planes layout never win), units ``[u0, u1)``. Per output row: the max of the
    three input rows, of three neighbouring columns, the output words picked at the stride, a copy per
    output plane; four loops, each over a whole row with unsigned indices (numba's negative-index checks
    and per-row slices kept :func:`maxpool`'s dozen short loops scalar: 2-3x this kernel's time). Column 0
    and column ``w - 1`` are set apart: their outside neighbour is another row's element when ``q_in ==
    w``. ``scratch``: uint64 (aligned 64-bit pairs), at least ``q_in + wo // 2 + 3`` of them (one per
    thread)."""
    qe = np.uint64(q_in * 4)
    we = np.uint64(4 * w)
    vm = scratch[: q_in // 2 + 1].view(np.uint8)  # one row's vertical maxima, then its window maxima
    hm = scratch[q_in // 2 + 1 : q_in + 2].view(np.uint8)
    h32, h64 = hm.view(np.uint32), hm.view(np.uint64)
    o32 = scratch[q_in + 2 : q_in + 2 + wo // 2 + 1].view(np.uint32)
    d32 = dst.view(np.uint32)
    ns = yoffs.shape[0]
    for u in range(u0, u1):
        for oy in range(ho):
            r = np.uint64((s_off + u * s_cstride + oy * st * q_in) * 4)  # rows -1 and h: zero padding
            for x in range(we):
                vm[x] = max(max(src[r - qe + x], src[r + x]), src[r + qe + x])
            for x in range(np.uint64(4), we - np.uint64(4)):
                hm[x] = max(max(vm[x - 4], vm[x]), vm[x + 4])
            for e in range(4):  # the edge columns: their inside neighbours only
                hm[e] = max(vm[e], vm[4 + e]) if w > 1 else vm[e]
                if w > 1:
                    hm[we - 4 + e] = max(vm[we - 4 + e], vm[we - 8 + e])
            if st == 2:  # the even words: the low (little-endian) halves of 64-bit pairs (vectorises)
                for ox in range(wo):
                    o32[ox] = np.uint32(h64[ox] & 0xFFFFFFFF)
            else:
                for ox in range(wo):
                    o32[ox] = h32[np.uint64(ox * st)]
            for s in range(ns):
                d = shifts[s]
                lo, hi = max(0, d), min(wo, qo + d)  # output columns whose shifted column is in [0, qo)
                base = np.uint64(u * ystride + yoffs[s] + oy * qo)
                for ox in range(np.uint64(lo), np.uint64(hi)):
                    d32[base + ox] = o32[ox]


@_jit(fastmath=False)
def global_pool_bytes(src, s_off, s_cstride, q, c, h, w, offset, mult, sh, s_out, out):
    """``prunekit.quant.glue.QuantizedGlobalAvgPool`` on a byte planes tensor (``src``: its bytes as
    uint8; offsets in 4-byte units): per channel the sum of its integers over ``h x w``, then
    ``out[ch] = float32(requantize_value(sum, mult, sh, -127, 127)) * s_out``. One call: in a forward
    pass every small NumPy or torch operation costs 20-80 us (the kernels before it evict the
    interpreter's state from the caches), which is what a dozen of them cost here. Per unit of 4 channels
    its rows are added bytewise into column sums (contiguous loops: they vectorise; a loop per channel
    over every 4th byte did not, 24 us at 512 x 7 x 7), then each channel's every 4th column is summed;
    +128-offset bytes are summed as uint8 and ``128 * h * w`` taken off, signed bytes read as int8."""
    signed = src.view(np.int8)
    cols = np.zeros(4 * w, np.int32)  # a column sum is at most h * 255
    for u in range((c + 3) // 4):
        cols[:] = 0
        for r in range(h):
            b = (s_off + u * s_cstride + r * q) * 4
            if offset:
                row = src[b : b + 4 * w]
                for i in range(4 * w):
                    cols[i] += np.int32(row[i])
            else:
                srow = signed[b : b + 4 * w]
                for i in range(4 * w):
                    cols[i] += np.int32(srow[i])
        for e in range(min(4, c - 4 * u)):
            total = np.int64(0)
            for x in range(w):
                total += cols[4 * x + e]
            if offset:
                total -= np.int64(offset) * h * w
            out[4 * u + e] = np.float32(requantize_value(total, mult, sh, -127, 127)) * s_out
