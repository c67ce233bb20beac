"""Direct sparse convolutions on the aligned-plane layout: weight packing, tile plans, and the per-layer
``nn.Module`` candidates (NCHW in, NCHW out) that :func:`prunekit.runtime.compile` times against dense.

:class:`DirectConvF32` and :class:`DirectConvI8` are one layer bound to an input :class:`Layout` and an
output planes layout; :mod:`prunekit.runtime.segment` chains them so activations stay in the layout
between layers. :class:`PlanesConv2d` / :class:`PlanesQuantizedConv2d` wrap one of them with the layout
conversions for a single layer (the conversions cost about as much as a sparse layer at 224x224, which is
why whole segments win).

What is supported: any kernel size, stride, zero padding and dilation, ``groups == 1``; everything else
stays dense (:func:`unsupported` says why). int8: prunekit's symmetric int8 (``QuantizedConv2d``) with 4x1
blocks over input channels; a signed input (not after a ReLU) runs with a +128 offset and a compensation
term on VNNI, and is refused on AVX2 (``vpmaddubsw`` would saturate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.runtime import conv_kernels as K
from prunekit.runtime import conv_layout as L
from prunekit.runtime import threads
from prunekit.runtime.conv_channels import ChannelSums
from prunekit.runtime.cpu import features

NO_CLAMP = (-np.inf, np.inf)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class ConvGeom:
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeom:
        return cls(
            conv.in_channels,
            conv.out_channels,
            _pair(conv.kernel_size),
            _pair(conv.stride),
            _pair(conv.padding),
            _pair(conv.dilation),
        )

    @property
    def args(self) -> tuple:
        return self.kernel, self.stride, self.padding, self.dilation

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return L.conv_out_hw(h, w, *self.args)


def unsupported(conv: nn.Module) -> str | None:
    """Why a convolution cannot run on the direct sparse kernels (None: it can)."""
    if getattr(conv, "groups", 1) != 1:
        return f"groups={conv.groups} (grouped/depthwise convolutions stay dense)"
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return f"padding_mode '{conv.padding_mode}'"
    if isinstance(conv.padding, str):
        return f"padding '{conv.padding}'"
    return None


def isa_name(vw: int | None = None) -> str:
    """The int8 path for this CPU (``PRUNEKIT_CPU_FEATURES`` honoured): ``vnni512`` or ``avx2``."""
    if vw is not None:
        return "vnni512" if vw == 16 else "avx2"
    return "vnni512" if features().vnni else "avx2"


def host_width() -> int:
    return features().vector_floats


def tile_options(vw: int) -> tuple[int, ...]:
    return K.NV16 if vw == 16 else K.NV8


def default_tile(vw: int, span: int) -> int:
    """Vectors per tile for an output span (``(ho - 1) * pitch + wo`` positions): the largest compiled
    tile that does not waste more than half a tile at the end."""
    options = tile_options(vw)
    for nv in sorted(options, reverse=True):
        if span >= nv * vw or nv == min(options):
            return nv
    return min(options)


def _tiles(out: L.Layout, tile: int) -> int:
    span = (out.height - 1) * out.pitch + out.width
    return max(1, -(-span // tile))


def _thread_geos(kernel, units: int) -> list[np.ndarray]:
    """The kernel's ``geo`` once per thread, each over its share of the ``units`` output groups (cached per
    thread count); one part when ``kernel.serial`` (``segment.tune`` times both: handing a chunk to a
    worker costs 5-10 us, more than it saves on a short layer)."""
    n = 1 if kernel.serial else threads.chunks(kernel.macs)
    found = kernel._parts.get(n)
    if found is None:
        cuts = threads.even_splits(units, n, align=1)
        found = []
        for c in range(len(cuts) - 1):
            g = kernel.geo.copy()
            g[7], g[8] = cuts[c], cuts[c + 1]
            found.append(g)
        kernel._parts[n] = found
    return found


class DirectConvF32:
    """One float32 convolution from ``inp`` (a gather made for it, or a planes tensor it reads directly)
    into the planes layout ``out`` (same pitch), with bias, optional residual (a float32 planes tensor of
    the output's size and pitch) and a clamp (ReLU: ``(0, inf)``, ReLU6: ``(0, 6)``) fused."""

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None,
        geom: ConvGeom,
        inp: L.Layout,
        out: L.Layout,
        *,
        nv: int,
        vw: int,
        cb: int | None = None,
        clamp=NO_CLAMP,
        residual: L.Layout | None = None,
    ) -> None:
        if inp.pitch != out.pitch:
            raise PrunekitError("DirectConvF32: input and output layouts must share a pitch")
        if nv not in tile_options(vw):
            raise PrunekitError(f"DirectConvF32: nv must be one of {tile_options(vw)} for vw={vw}, got {nv}")
        self.geom, self.inp, self.out, self.nv, self.vw = geom, inp, out, nv, vw
        cout, cin = geom.cout, geom.cin
        self.cb = min(cb or cin, cin)
        co, ci, ti, tj = np.nonzero(weight)
        offs = L.tap_offsets(inp, *geom.args, ci, ti, tj)
        if offs.size and (offs.max() + inp.plane >= 2**31):
            raise PrunekitError("DirectConvF32: input too large for 32-bit offsets")
        blk = ci // self.cb
        order = np.lexsort((offs, co, blk))
        self.offs = offs[order].astype(np.int32)
        self.vals = np.ascontiguousarray(weight[co, ci, ti, tj][order], dtype=np.float32)
        ncb = -(-cin // self.cb)
        counts = np.zeros((ncb, cout), np.int64)
        np.add.at(counts, (blk, co), 1)
        flat = np.concatenate([[0], np.cumsum(counts.reshape(-1))])
        self.ptr = np.ascontiguousarray(np.stack([flat[b * cout : b * cout + cout + 1] for b in range(ncb)]))
        self.nnz = int(self.vals.size)
        self.bias = np.zeros(cout, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.clamp = np.array(clamp, dtype=np.float32)
        tile = nv * vw
        ntiles = _tiles(out, tile)
        yoffs, masks = L.store_plan(out, tile, ntiles)
        self.yoffs, self.masks = yoffs, masks.astype(np.float32)
        self.scratch = np.zeros(cout * tile + 16, np.float32)
        if residual is not None and (residual.pitch != out.pitch or residual.units != cout):
            raise PrunekitError("DirectConvF32: the residual must match the output's pitch and channels")
        rbase, rstride = (residual.col0(), residual.per_unit * residual.plane) if residual else (0, 0)
        self.residual = residual
        self.geo = np.array(
            [
                ntiles,
                0,
                out.per_unit * out.plane,
                len(out.cols),
                ntiles * tile,
                rbase,
                rstride,
                0,
                cout,
                residual is not None,
            ],
            dtype=np.int64,
        )
        self._parts: dict[int, list[np.ndarray]] = {}
        self.serial = False  # one thread whatever torch's count (segment.tune times both)

    @property
    def macs(self) -> int:
        return self.nnz * self.out.height * self.out.width

    def _geos(self) -> list[np.ndarray]:
        return _thread_geos(self, self.geom.cout)

    def __call__(self, X: np.ndarray, Y: np.ndarray, R: np.ndarray | None = None) -> None:
        xf, yf = X.view(np.float32), Y.view(np.float32)
        rf = yf if R is None else R.view(np.float32)
        args = (
            self.vw,
            self.nv,
            self.ptr,
            self.offs,
            self.vals,
            xf,
            yf,
            self.yoffs,
            self.masks,
            self.bias,
            self.clamp,
            rf,
            self.scratch,
        )
        threads.run(K.conv_f32, [(*args, g) for g in self._geos()])


def _padded_blocks(wq: np.ndarray) -> np.ndarray:
    """int8 weights (cout, cin, kh, kw) zero-padded to multiples of 4 output and input channels, as 4x1
    blocks: (cpad, in groups, 4, kh, kw)."""
    cout, cin, kh, kw = wq.shape
    padded = np.zeros((-(-cout // 4) * 4, -(-cin // 4) * 4, kh, kw), np.int8)
    padded[:cout, :cin] = wq
    return padded.reshape(padded.shape[0], -1, 4, kh, kw)


def _alive(blocks: np.ndarray) -> np.ndarray:
    """Which blocks of :func:`_padded_blocks` hold a nonzero: (cpad, in groups, kh, kw) booleans."""
    return np.abs(blocks.astype(np.int32)).sum(axis=2) > 0


def block_alive(wq: np.ndarray) -> np.ndarray:
    """Which 4x1 blocks of the int8 weights hold a nonzero: (cpad, in groups, kh, kw) booleans."""
    return _alive(_padded_blocks(wq))


def group_union(alive: np.ndarray) -> np.ndarray:
    """The blocks alive in any of a group of 4 output channels: (cpad / 4, in groups, kh, kw) booleans."""
    return alive.reshape(-1, 4, *alive.shape[1:]).any(axis=1)


def _csr(blk: np.ndarray, rows: np.ndarray, nrows: int, ncb: int) -> np.ndarray:
    """Row pointers (ncb, nrows + 1) of entries sorted by (channel block ``blk``, row ``rows``)."""
    counts = np.zeros((ncb, nrows), np.int64)
    np.add.at(counts, (blk, rows), 1)
    flat = np.concatenate([[0], np.cumsum(counts.reshape(-1))])
    return np.ascontiguousarray(np.stack([flat[b * nrows : b * nrows + nrows + 1] for b in range(ncb)]))


def _rowsum(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype(np.int64).reshape(blocks.shape[0], -1).sum(axis=1)


def pack_blocks(wq: np.ndarray, inp: L.Layout, geom: ConvGeom, cbg: int | None):
    """int8 weights as 4x1 blocks (4 consecutive input channels at one output channel and tap): per block
    its input offset and its 4 bytes in one int32, CSR over output channels (padded to a multiple of 4)
    per block of ``cbg`` input-channel groups; plus each channel's weight sum (for the +128 offset)."""
    blocks = _padded_blocks(wq)
    cpad, groups = blocks.shape[:2]
    co, g, ti, tj = np.nonzero(_alive(blocks))
    offs = L.tap_offsets(inp, *geom.args, g, ti, tj)
    cbg = min(cbg or groups, groups)
    blk = g // cbg
    order = np.lexsort((offs, co, blk))
    four = np.ascontiguousarray(blocks.transpose(0, 1, 3, 4, 2)[co, g, ti, tj][order])
    wv = four.view(np.int32)[:, 0].copy() if four.size else np.zeros(0, np.int32)
    ptr = _csr(blk, co, cpad, -(-groups // cbg))
    return ptr, offs[order].astype(np.int32), wv, _rowsum(blocks)


def pack_group_blocks(wq: np.ndarray, inp: L.Layout, geom: ConvGeom, cbg: int | None):
    """:func:`pack_blocks` for the shared-load kernel (``conv_kernels._i8_group_tile``): per group of 4
    output channels the *union* of their 4x1 blocks, each with its input offset and 4 weights (one int32 per
    channel of the group, zero where that channel lacks the block), CSR over groups per block of ``cbg``
    input-channel groups. Each activation vector is then loaded once for 4 output channels (a dense
    layer: 4x fewer loads); a block alive in one channel of the group costs 4 dot products, so sparse
    layers pay for the union, and the timing decides."""
    blocks = _padded_blocks(wq)
    cpad, groups = blocks.shape[:2]
    by_group = blocks.reshape(cpad // 4, 4, *blocks.shape[1:])  # (out group, row, in group, 4, kh, kw)
    og, g, ti, tj = np.nonzero(group_union(_alive(blocks)))
    offs = L.tap_offsets(inp, *geom.args, g, ti, tj)
    cbg = min(cbg or groups, groups)
    blk = g // cbg
    order = np.lexsort((offs, og, blk))
    four = by_group.transpose(0, 2, 4, 5, 1, 3)[og, g, ti, tj][order]  # (n, row, 4 input channels)
    wv = np.ascontiguousarray(four).view(np.int32).reshape(-1).copy() if four.size else np.zeros(0, np.int32)
    ptr = _csr(blk, og, cpad // 4, -(-groups // cbg))
    return ptr, offs[order].astype(np.int32), wv, _rowsum(blocks)


@dataclass(frozen=True)
class Requant:
    """An int8 layer's integer output form (``prunekit.quant.layers``, ``out_scale`` set): per output
    channel ``bias_q``, ``mult``, ``shift`` (int64), the clamp ``[lo, hi]`` (int8, or int32 for the wide
    form) and ``out_scale``; the kernel computes :func:`prunekit.quant.rounding.requantize_value`."""

    bias_q: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    lo: int
    hi: int
    out_scale: float

    @classmethod
    def of(cls, module: nn.Module) -> Requant | None:
        """The constants of a ``QuantizedConv2d`` in the integer output form (None: the float form)."""
        if getattr(module, "out_scale", None) is None:
            return None
        lo, hi = (int(v) for v in module.out_range)
        return cls(
            module.bias_q.numpy().astype(np.int64),
            module.out_mult.numpy().astype(np.int64),
            module.out_shift.numpy().astype(np.int64),
            lo,
            hi,
            float(module.out_scale.item()),
        )


@dataclass(frozen=True)
class IntAdd:
    """A ``prunekit.quant.glue.QuantizedAdd`` fused after the convolution: ``a`` is the convolution's output
    at ``scale_a``, ``b`` the residual at ``scale_b``; ``ma, mb, sh`` its fixed-point constants."""

    scale_a: float
    scale_b: float
    scale_out: float
    ma: int
    mb: int
    sh: int

    @classmethod
    def of(cls, module: nn.Module, conv_first: bool) -> IntAdd:
        """The add's constants, the convolution as operand ``a`` (``conv_first``: it was ``a`` already)."""
        (sa, sb, so), (ma, mb, sh) = module.scales.tolist(), module.consts.tolist()
        return cls(sa, sb, so, ma, mb, sh) if conv_first else cls(sb, sa, so, mb, ma, sh)


def _f32(v) -> np.float32:
    return np.float32(v)


F64_MAX_SHIFT = 45  # 128 * 2**45 + 2 * 2**31 < 2**53: requant_f64's products stay exact in float64


def requant_f64(requant: Requant) -> tuple[np.ndarray, np.ndarray]:
    """Per channel ``(bound, factor bits)`` of the integer chain's float64 requantization
    (``conv_kernels.requantize_f64``): ``bound = 128 * 2**shift // mult + 2`` (past it, ``rshift_round(v *
    mult, shift)`` is beyond +-127 and saturates; capped at 2**31 - 1, which no int32 exceeds) and ``factor
    = mult * 2**-shift`` as int64 bits. With ``shift <= F64_MAX_SHIFT`` every ``|v| <= bound`` has ``|v| *
    mult < 2**53``: the float64 product is exact, so is its rounding half to even."""
    mult, shift = requant.mult.astype(np.int64), requant.shift.astype(np.int64)
    safe = np.minimum(shift, F64_MAX_SHIFT)
    bound = np.where(mult > 0, (np.int64(128) << safe) // np.maximum(mult, 1) + 2, 2**30)
    factor = mult.astype(np.float64) * np.ldexp(1.0, -shift)
    return np.minimum(bound, 2**31 - 1), factor.view(np.int64)


def chain_reason(
    requant: Requant | None, clamp, add: IntAdd | None, s_bytes: float | None, taps: int
) -> str | None:
    """Why an int8 convolution's output cannot stay in integers (None: it can). The integer chain computes
    the same integers as the float spelling of the integer output form (``y = float32(q) * s``, a ReLU,
    ``round(y / s_next)``; a fused add recovering ``round(y / s_a)``) because recovering ``q`` from
    ``float32(q) * s`` at the same ``s`` is exact; so every scale on the way must be that same ``s``, and the
    clamp a plain ReLU or nothing (ReLU6's 6.0 is not a multiple of the scale). Its requantization runs in
    float64 (:func:`requant_f64`): shifts up to ``F64_MAX_SHIFT`` and ``acc + bias_q`` within int32 (``taps``:
    the input values one output sums, 127 * 127 each at most)."""
    if requant is None:
        return "float output form (no fixed-point requantization)"
    if requant.lo < -127 or requant.hi > 127:
        return f"output range [{requant.lo}, {requant.hi}] is wider than int8"
    if requant.shift.size and int(requant.shift.max()) > F64_MAX_SHIFT:
        return f"a requantization shift above {F64_MAX_SHIFT} (multiplier below 2**-14)"
    if requant.bias_q.size and int(np.abs(requant.bias_q).max()) + 127 * 127 * taps >= 2**31:
        return "accumulator plus bias may leave int32"
    lo, hi = (float(v) for v in clamp)
    if not (hi == np.inf and lo in (-np.inf, 0.0)):
        return f"clamp [{lo}, {hi}] is not a ReLU"
    s_out = requant.out_scale
    if add is not None:
        if _f32(add.scale_a) != _f32(s_out):
            return "the add rescales the convolution's output"
        s_out = add.scale_out
    if s_bytes is not None and _f32(s_bytes) != _f32(s_out):
        return "the next layer reads another scale"
    return None


def final_scale(requant: Requant, add: IntAdd | None) -> float:
    """The scale of an integer-chain convolution's output (its own, or its fused add's)."""
    return add.scale_out if add is not None else requant.out_scale


@dataclass
class Int8Out:
    """What an int8 convolution's epilogue writes: bytes for the next int8 layer (scale ``s_next``,
    lowest level ``qlo`` -- 0 after a ReLU -- and ``offset`` 0 or 128) into the planes layout ``layout``
    and/or float32 values into the planes layout ``floats`` (for residual adds and exits)."""

    layout: L.Layout | None = None
    s_next: float = 1.0
    qlo: float = -127.0
    offset: int = 0
    floats: L.Layout | None = None


class DirectConvI8:
    """One int8 convolution (prunekit's arithmetic, :func:`conv_kernels.int8_epilogue`) from the byte
    layout ``inp`` (units of 4 channels; ``offset`` 128 when its bytes are +128-encoded) to ``out``."""

    def __init__(
        self,
        wq: np.ndarray,
        scale: np.ndarray,
        bias: np.ndarray | None,
        geom: ConvGeom,
        inp: L.Layout,
        out: Int8Out,
        *,
        nv: int,
        isa: str,
        cbg: int | None = None,
        offset: int = 0,
        clamp=NO_CLAMP,
        residual: L.Layout | None = None,
        requant: Requant | None = None,
        add: IntAdd | None = None,
        chain: bool = False,
        residual_offset: int = 0,
        shared: bool = False,
        channels: bool = False,
        unrolled: bool = True,
    ) -> None:
        """``chain``: the integer epilogue (``conv_kernels.FLAG_CHAIN``; the caller checked
        :func:`chain_reason` is None): ``residual`` is then the residual's *byte* layout (``residual_offset``
        128 when its bytes are +128-encoded). ``shared``: the sums by :func:`pack_group_blocks`' kernel (VNNI,
        ``nv`` in ``SHARED_NV``). ``channels``: the sums with output channels in the lanes
        (:mod:`prunekit.runtime.conv_channels`, VNNI), then the epilogue on them as whole accumulators
        (``nv``: the epilogue's tile). ``unrolled``: the integer
        chain's epilogue by ``conv_kernels._chain_epilogue`` where it applies (False: the per-row one; the
        same integers, for comparisons)."""
        vw = 16 if isa == "vnni512" else 8
        if isa not in K.ISAS:
            raise PrunekitError(f"DirectConvI8: isa must be one of {', '.join(K.ISAS)}, got {isa!r}")
        if offset and isa != "vnni512":
            raise PrunekitError(
                "DirectConvI8: a +128-offset (signed) input needs VNNI (vpmaddubsw saturates)"
            )
        if nv not in tile_options(vw):
            raise PrunekitError(f"DirectConvI8: nv must be one of {tile_options(vw)} for {isa}, got {nv}")
        dest = out.layout or out.floats
        if dest is None or inp.pitch != dest.pitch:
            raise PrunekitError("DirectConvI8: needs an output layout with the input's pitch")
        self.geom, self.inp, self.out, self.nv, self.vw, self.isa = geom, inp, out, nv, vw, isa
        cout = geom.cout
        cpad = -(-cout // 4) * 4
        if shared and (isa != "vnni512" or nv not in K.SHARED_NV):
            raise PrunekitError(f"DirectConvI8: shared loads need vnni512 and nv in {K.SHARED_NV}")
        self.shared = shared
        self.channels: ChannelSums | None = None
        if channels:  # its own packing; the tiles run the epilogue alone (no blocks)
            self.channels = ChannelSums(wq, inp, geom, dest, isa, ntiles=_tiles(dest, nv * vw), tile=nv * vw)
            self.ptr, self.offs, self.wv = (
                np.zeros((1, cpad + 1), np.int64),
                np.zeros(0, np.int32),
                np.zeros(0, np.int32),
            )
            rowsum, self.blocks = _rowsum(_padded_blocks(wq)), self.channels.dots
        else:
            pack = pack_group_blocks if shared else pack_blocks
            self.ptr, self.offs, self.wv, rowsum = pack(wq, inp, geom, cbg)
            self.blocks = int(self.wv.size)  # dot products per position group (shared: 4 per union block)
        self.comp = (-offset * rowsum).astype(np.int32)
        self.scale = np.zeros(cpad, np.float32)
        self.scale[:cout] = scale
        self.bias = np.zeros(cpad, np.float32)
        if bias is not None:
            self.bias[:cout] = bias
        # the integer output form: lo, hi, a fused add's Ma, Mb, sh, then (bias_q, mult, shift) per channel
        # (padding channels: 0, 0, 1 -> 0)
        self.rq = np.zeros(K.RQ_HEAD + K.RQ_STRIDE * cpad, np.int64)
        per = self.rq[K.RQ_HEAD :].reshape(cpad, K.RQ_STRIDE)
        per[:, 2], per[:, 3] = 1, 2**30
        self.rq[4] = 1
        if requant is not None:
            self.rq[0], self.rq[1] = requant.lo, requant.hi
            per[:cout, 0], per[:cout, 1], per[:cout, 2] = requant.bias_q, requant.mult, requant.shift
            per[:cout, 3], per[:cout, 4] = requant_f64(requant)
            self.scale[:cout] = np.float32(requant.out_scale)  # y = float32(q) * out_scale
        self.clamp = np.array(clamp, dtype=np.float32)
        # s_next, qlo, offset, zero pattern; a fused add's s_a, s_b, s_out; the integer chain's lowest value
        # and the residual bytes' key (conv_kernels.residual_byte)
        q = np.ones(10, np.float32)
        q[0], q[1] = out.s_next, out.qlo
        q.view(np.int32)[2] = out.offset
        q.view(np.int32)[3] = L.ZERO_OFFSET if out.offset else 0
        self.q = q
        tile = nv * vw
        ntiles = _tiles(dest, tile)
        if out.layout is not None:
            yoffs, masks = L.store_plan(out.layout, tile, ntiles)
            self.yoffs, self.masks = yoffs, np.where(masks, -1, 0).astype(np.int32)
            ystride = out.layout.per_unit * out.layout.plane
        else:
            self.yoffs, self.masks, ystride = np.zeros(0, np.int64), np.zeros(16, np.int32), 0
        if out.floats is not None and out.floats.units < cpad:  # the epilogue stores 4 channels at a time
            raise PrunekitError("DirectConvI8: the float32 output needs room for a multiple of 4 channels")
        flags = 0
        if chain:
            taps = wq.shape[1] * wq.shape[2] * wq.shape[3]
            why = chain_reason(requant, clamp, add, out.s_next if out.layout is not None else None, taps)
            if why is not None:
                raise PrunekitError(f"DirectConvI8: no integer chain here: {why}")
            flags |= 1 << K.FLAG_CHAIN
            if isa == "vnni512" and nv in K.SHARED_NV and unrolled:
                flags |= 1 << K.FLAG_UNROLLED
            q.view(np.int32)[7] = 0 if clamp[0] == 0 else np.iinfo(np.int32).min
            q.view(np.int32)[8] = residual_offset ^ 128
        if residual is not None:
            units = residual.units * 4 if chain else residual.units  # bytes: 4 channels a unit
            if residual.pitch != dest.pitch or units < cpad:
                raise PrunekitError("DirectConvI8: the residual must match the output's pitch and channels")
            flags |= 1 << K.FLAG_RESID
        if out.floats is not None:
            flags |= 1 << K.FLAG_FLOAT_OUT
        if out.layout is not None:
            flags |= 1 << K.FLAG_BYTES_OUT
        if requant is not None:
            flags |= 1 << K.FLAG_INTEGER
        if add is not None:
            if residual is None:
                raise PrunekitError("DirectConvI8: an integer add needs the residual's layout")
            flags |= 1 << K.FLAG_QADD
            q[4], q[5], q[6] = add.scale_a, add.scale_b, add.scale_out
            self.rq[2], self.rq[3], self.rq[4] = add.ma, add.mb, add.sh
        s_fin = np.float32(q[6]) if add is not None else self.scale
        self.cst = K.chain_constants(self.comp, per[:, 0], per[:, 3], per[:, 4], s_fin)
        rbase, rstride = (residual.col0(), residual.per_unit * residual.plane) if residual else (0, 0)
        fl = out.floats
        fbase, fstride = (fl.col0(), fl.per_unit * fl.plane) if fl else (0, 0)
        # the tiles' sums (channel lanes: never used, their whole accumulators are passed in)
        self.scratch = np.zeros(0 if channels else cpad * tile + 16, np.int32)
        self.geo = np.array(
            [
                ntiles,
                0,
                ystride,
                len(self.yoffs),
                ntiles * tile,
                rbase,
                rstride,
                0,
                cpad // 4,
                flags,
                fbase,
                fstride,
                0,
                int(shared),
            ],
            dtype=np.int64,
        )
        self._parts: dict[int, list[np.ndarray]] = {}
        self._whole_parts: dict[tuple[int, int], list[np.ndarray]] = {}
        self.serial = False  # one thread whatever torch's count (segment.tune times both)
        # the epilogue loads the residual before it knows whether to add it (a select, not a branch): without
        # a residual it reads these zeros, which cover every position a tile reaches
        self._float_dummy = np.zeros(ntiles * tile + 64, np.float32)
        self._no_blocks = np.zeros((1, cpad + 1), np.int64)
        self._whole = ntiles * tile + 16
        self._acc: np.ndarray | None = None

    @property
    def macs(self) -> int:
        return 4 * self.blocks * self.inp.height * self.inp.width

    def _geos(self) -> list[np.ndarray]:
        return _thread_geos(self, int(self.geo[8]))

    def _whole_geos(self, stride: int) -> list[np.ndarray]:
        """:meth:`_geos` for the epilogue alone on whole accumulators (``stride`` per channel), cached per
        stride and thread count."""
        tiled = self._geos()
        found = self._whole_parts.get((stride, len(tiled)))
        if found is None:
            found = [g.copy() for g in tiled]
            for g in found:
                g[12], g[13] = stride, 0
            self._whole_parts[(stride, len(tiled))] = found
        return found

    def __call__(
        self,
        X: np.ndarray,
        Y: np.ndarray | None,
        R: np.ndarray | None = None,
        F: np.ndarray | None = None,
        acc: np.ndarray | None = None,
        acc_stride: int = 0,
    ) -> None:
        """``acc`` (int32, ``acc_stride`` per channel, positions as the output tile): whole accumulators to
        start from (the dense path: exact sums computed elsewhere, the epilogue here)."""
        if self.channels is not None and acc is None:  # the sums channels-first, then the epilogue on them
            self.channels(X, 1 if self.serial else threads.chunks(self.macs))
            acc, acc_stride = self.channels.acc, self.channels.whole
        yb = Y if Y is not None else self.masks
        rf = self._float_dummy if R is None else R.view(np.float32)
        ff = self._float_dummy if F is None else F.view(np.float32)
        scratch = self.scratch if acc is None else acc
        args = (
            self.vw,
            self.nv,
            self.ptr if acc is None else self._no_blocks,
            self.offs,
            self.wv,
            X,
            yb,
            self.yoffs,
            self.masks,
            self.comp,
            self.scale,
            self.bias,
            self.clamp,
            rf,
            self.q,
            ff,
            self.rq,
            scratch,
            self._no_blocks,
            self.cst,
        )
        geos = self._geos() if acc is None else self._whole_geos(acc_stride)  # whole: the epilogue alone
        threads.run(K.conv_i8, [(*args, g) for g in geos])

    def finish(self, acc: np.ndarray, Y: np.ndarray | None, R: np.ndarray | None = None,
               F: np.ndarray | None = None) -> None:  # fmt: skip
        """The epilogue alone (:func:`conv_kernels.int8_epilogue`, the same code as after the sparse sums) on
        exact accumulators ``acc`` (cout, ho, wo; integer values) computed elsewhere: the dense path."""
        dest = self.out.layout or self.out.floats
        cout, ho, wo, q = self.geom.cout, dest.height, dest.width, dest.pitch
        if self._acc is None:
            self._acc = np.zeros(self.scale.size * self._whole, np.int32)
        rows = self._acc.reshape(self.scale.size, self._whole)[:cout, : ho * q].reshape(cout, ho, q)
        rows[:, :, :wo] = acc
        self(self.masks, Y, R, F, acc=self._acc, acc_stride=self._whole)


# -- per-layer candidates: NCHW in, NCHW out ----------------------------------------------------------------
class _PlanesBase(nn.Module):
    kernel = "planes"

    def _check(self, x: Tensor) -> np.ndarray:
        return x.detach().to(torch.float32).contiguous().numpy()

    def forward(self, x: Tensor) -> Tensor:
        """Image by image (the kernels are built for batch 1); (C, H, W) inputs too."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise PrunekitError(
                f"{type(self).__name__} is inference-only: run it under torch.inference_mode()"
            )
        if x.dim() not in (3, 4) or x.shape[-3] != self.geom.cin:
            raise PrunekitError(
                f"{type(self).__name__} expects inputs (N, {self.geom.cin}, H, W), got {tuple(x.shape)}"
            )
        if x.dim() == 3:
            return self.image(x[None])[0]
        if x.shape[0] == 1:
            return self.image(x)
        return torch.cat([self.image(x[i : i + 1]) for i in range(x.shape[0])])


class PlanesConv2d(_PlanesBase):
    """``nn.Conv2d`` (float32, batch 1) on :class:`DirectConvF32`: the input gathered into the layout,
    the output read back to NCHW on every call. ``nv``/``vw``/``cb``: the tile (compile times a few)."""

    def __init__(self, conv: nn.Conv2d, nv: int | None = None, vw: int | None = None, cb: int | None = None):
        super().__init__()
        reason = unsupported(conv)
        if reason is not None:
            raise PrunekitError(f"PlanesConv2d cannot run a convolution with {reason}")
        self.geom = ConvGeom.of(conv)
        self.weight = conv.weight.detach().to(torch.float32).numpy().copy()
        self.bias = None if conv.bias is None else conv.bias.detach().to(torch.float32).numpy().copy()
        self.vw = vw or host_width()
        self.nv, self.cb = nv, cb
        self._plans: dict[tuple[int, int], tuple] = {}

    def _plan(self, h: int, w: int):
        found = self._plans.get((h, w))
        if found is None:
            g = self.geom
            inp = L.gather(g.cin, h, w, *g.args)
            out = L.planes(g.cout, inp.height, inp.width, 0, 0, (), pitch=inp.pitch)
            nv = self.nv or default_tile(self.vw, (out.height - 1) * out.pitch + out.width)
            conv = DirectConvF32(self.weight, self.bias, g, inp, out, nv=nv, vw=self.vw, cb=self.cb)
            found = (inp, L.fill_geo(inp), inp.alloc(), out, out.alloc(), conv)
            self._plans[(h, w)] = found
        return found

    def image(self, x: Tensor) -> Tensor:
        a = self._check(x)
        h, w = a.shape[2], a.shape[3]
        inp, geo, X, out, Y, conv = self._plan(h, w)
        L.fill(a.reshape(-1).view(np.int32), 0, h * w, w, h, w, self.geom.cin, X, geo, np.int32(0))
        conv(X, Y)
        return torch.from_numpy(L.read_nchw(Y, out, self.geom.cout))

    def extra_repr(self) -> str:
        nnz = int(np.count_nonzero(self.weight))
        return f"{self.geom}, nv={self.nv}, vw={self.vw}, cb={self.cb}, nonzeros={nnz}"


class PlanesQuantizedConv2d(_PlanesBase):
    """``prunekit.quant.layers.QuantizedConv2d`` (batch 1) on :class:`DirectConvI8`, bit for bit: the input
    quantized with the layer's scale (static, or dynamic ``max|x| / 127``) into 4-channel units, the exact
    int32 sums, then :func:`conv_kernels.int8_epilogue` into float32 (the layer's output form: the
    fixed-point requantization when it has ``out_scale``, else ``float32(acc) * (s_x * s_w) + bias``). A
    call whose input has negative values runs with the +128 offset on VNNI; on AVX2 it computes the same
    integers as a float32 convolution on the integer values (exact below 2**24, as ``runtime.layers``
    checks) instead."""

    def __init__(
        self, module: nn.Module, nv: int | None = None, isa: str | None = None, cbg: int | None = None
    ):
        super().__init__()
        reason = unsupported(module)
        if reason is not None:
            raise PrunekitError(f"PlanesQuantizedConv2d cannot run a convolution with {reason}")
        self.geom = ConvGeom.of(module)
        self.wq = module.weight_q.detach().numpy().copy()
        self.weight_scale = module.weight_scale.detach().to(torch.float32).numpy().copy()
        self.act_scale = None if module.act_scale is None else np.float32(module.act_scale.item())
        self.bias = None if module.bias is None else module.bias.detach().to(torch.float32).numpy().copy()
        self.requant = Requant.of(module)  # the integer output form, or None
        self.isa = isa or isa_name()
        self.nv, self.cbg = nv, cbg
        self._plans: dict[tuple, tuple] = {}
        self._dense_w = torch.from_numpy(self.wq.astype(np.float32))

    def _plan(self, h: int, w: int, offset: int):
        key = (h, w, offset)
        found = self._plans.get(key)
        if found is None:
            g = self.geom
            groups = -(-g.cin // 4)
            inp = L.gather(groups, h, w, *g.args)
            floats = L.planes(L.roundup(g.cout, 4), inp.height, inp.width, 0, 0, (), pitch=inp.pitch)
            vw = 16 if self.isa == "vnni512" else 8
            nv = self.nv or default_tile(vw, (floats.height - 1) * floats.pitch + floats.width)
            conv = DirectConvI8(
                self.wq,
                np.zeros(g.cout, np.float32),
                self.bias,
                g,
                inp,
                Int8Out(floats=floats),
                nv=nv,
                isa=self.isa,
                cbg=self.cbg,
                offset=offset,
                requant=self.requant,
            )
            packed = np.empty(groups * h * w, np.int32)
            found = (inp, L.fill_geo(inp), inp.alloc(), floats, floats.alloc(), conv, packed)
            self._plans[key] = found
        return found

    def image(self, x: Tensor) -> Tensor:
        a = self._check(x)
        h, w = a.shape[2], a.shape[3]
        flat = a.reshape(-1)
        s_x = self.act_scale
        if s_x is None:
            top = np.float32(np.abs(flat).max()) if flat.size else np.float32(0)
            s_x = np.float32(top / np.float32(127.0)) if top > 0 else np.float32(1.0)
        signed = bool(flat.size) and float(flat.min()) < -0.5 * float(s_x)  # any value that rounds below 0
        dense = signed and self.isa != "vnni512"
        offset = 128 if signed and not dense else 0
        inp, geo, X, floats, F, conv, packed = self._plan(h, w, offset)
        if self.requant is None:  # the float form: scale = s_x * s_w (the integer form holds out_scale)
            conv.scale[: self.geom.cout] = np.float32(s_x) * self.weight_scale
        if dense:
            conv.finish(self._dense_acc(x, s_x), None, F=F)
            return self._read(floats, F)
        L.quantize_pack(flat, self.geom.cin, h * w, s_x, offset, packed)
        L.fill(packed, 0, h * w, w, h, w, inp.units, X, geo, L.ZERO_OFFSET if offset else np.int32(0))
        conv(X, None, F=F)
        return self._read(floats, F)

    def _read(self, floats: L.Layout, F: np.ndarray) -> Tensor:
        return torch.from_numpy(L.read_nchw(F, floats, self.geom.cout))

    def _dense_acc(self, x: Tensor, s_x: np.float32) -> np.ndarray:
        """The exact integer sums from a float32 convolution of the integer values (exact: sums < 2**24)."""
        g, c = self.geom, x.shape[1]
        h, w = x.shape[2], x.shape[3]
        packed = np.empty(-(-c // 4) * h * w, np.int32)
        L.quantize_pack(
            x.detach().to(torch.float32).contiguous().numpy().reshape(-1), c, h * w, s_x, 0, packed
        )
        q = torch.from_numpy(unpack_bytes(packed, c, h, w, 0))[None]
        acc = torch.nn.functional.conv2d(q, self._dense_w, None, g.stride, g.padding, g.dilation)
        return acc[0].numpy().astype(np.int32)


def unpack_bytes(units: np.ndarray, c: int, h: int, w: int, offset: int) -> np.ndarray:
    """Packed int8 units (ceil(c / 4), h, w) -> float32 integer values (c, h, w), ``offset`` removed."""
    b = units.view(np.uint8 if offset else np.int8).reshape(-1, h, w, 4)
    q = np.moveaxis(b, 3, 1).reshape(-1, h, w)[:c].astype(np.float32)
    return q - np.float32(offset) if offset else q
