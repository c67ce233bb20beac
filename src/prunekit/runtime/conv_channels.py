"""int8 convolution sums with output *channels* as the vector lanes, for small feature maps (AVX-512 VNNI).

The sparse kernels of :mod:`prunekit.runtime.conv_kernels` put output positions in the lanes (Elsen et
al. 2020): a 7x7 map (ResNet-18's last stage at 224x224) fills 49 of the 64 lanes of its tile, whatever
the weights, so its layers run at 49/64 of the core's dot-product peak. Here the lanes hold 16 output
channels instead, as dense int8 GEMM kernels usually do (activations broadcast, weights as vectors): for a
run of ``G <= 8`` consecutive output positions of one row and a block of 32 output channels,

    A[co, p + i] = sum over the block's entries k of dot4(X[offs[k] + p + i], W[k, co])   (i < G)

where an entry is one (4-input-channel unit, tap) alive in any of the block's 32 channels (a channel-pruned
or dense layer: all of them), ``X[...]`` is the unit's 4 activation bytes broadcast to every lane, and
``W[k]`` holds the 4 weights of each of the 32 channels (two 16-lane vectors). One ``vpdpbusd`` per
position and vector: ``2 * G`` accumulators stay in registers over the whole reduction. Only the map's
positions are computed, so every lane is useful; the accumulators are then transposed into ``A``
(channel-major, the layout of ``DirectConvI8``'s whole accumulators) and the ordinary epilogue
(:func:`conv_kernels.int8_epilogue`, the one requantization rule) runs on them. Each run pays a transpose
of ``32 * G`` values (in registers: :func:`_transpose_store`), so layers with many input channels per
position gain most; ``segment.tune`` times it against the position kernels per layer.

The loads of ``X`` use the position kernels' offsets (:func:`conv_layout.tap_offsets`), so any layout
they read, strided gathers included, works here.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from prunekit.errors import PrunekitError
from prunekit.runtime import conv_layout as L
from prunekit.runtime import threads
from prunekit.runtime.conv_kernels import _c64, _dot4, _ints, _jit, _splat, _unpack, _vload
from prunekit.runtime.kernels import emit_loop

LANES = 16
BLOCK = 2 * LANES  # output channels per block: two vectors
MAX_RUN = 8  # positions per run: 2 * 8 accumulators, 2 weight vectors and a broadcast fit 32 registers

_I32 = ir.IntType(32)


def run_lengths(width: int) -> list[int]:
    """How a row of ``width`` output positions splits into runs: equal runs of 8 or 7 where one divides it
    (ResNets at 224x224: 112, 56, 28, 14, 7), else runs of 8 and the rest."""
    g = next((g for g in (8, 7) if width % g == 0), MAX_RUN)
    return [g] * (width // g) + ([width % g] if width % g else [])


def pack_channel_blocks(wq: np.ndarray, inp: L.Layout, geom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 weights (cout, cin, kh, kw) as entries per block of 32 output channels (cout padded with zero
    channels): CSR row pointers over blocks (``nblocks + 1``), each entry's input offset (int32), and its
    weights: 32 int32 per entry, the 4 bytes (4 consecutive input channels) of each channel of the block.
    An entry is a (unit of 4 input channels, tap) with a nonzero weight in any channel of the block."""
    cout, cin, kh, kw = wq.shape
    cpad, upad = -(-cout // BLOCK) * BLOCK, -(-cin // 4) * 4
    w = np.zeros((cpad, upad, kh, kw), np.int8)
    w[:cout, :cin] = wq
    # (block, unit, tap i, tap j, channel in block, 4 input channels)
    blocks = w.reshape(cpad // BLOCK, BLOCK, upad // 4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    alive = np.abs(blocks.astype(np.int32)).sum(axis=(4, 5)) > 0
    b, u, ti, tj = np.nonzero(alive)
    offs = L.tap_offsets(inp, *geom.args, u, ti, tj)
    order = np.lexsort((offs, b))
    four = np.ascontiguousarray(blocks[b, u, ti, tj][order])  # (n, 32, 4)
    wv = four.view(np.int32).reshape(-1).copy() if four.size else np.zeros(0, np.int32)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=cpad // BLOCK))]).astype(np.int64)
    return ptr, offs[order].astype(np.int32), wv


def runs(height: int, width: int, pitch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every run of a (height, width) map: its first position ``y * pitch + x`` and its length."""
    lens = run_lengths(width)
    xs = np.cumsum([0, *lens[:-1]])
    starts = (np.arange(height)[:, None] * pitch + xs[None, :]).reshape(-1)
    return starts.astype(np.int64), np.tile(np.array(lens, np.int64), height)


def _transpose_store(
    builder: ir.IRBuilder, vecs: list, ap: ir.Value, base: ir.Value, whole: ir.Value
) -> None:
    """``vecs``: ``g <= 8`` vectors of 16 channels (position ``i``'s sums). Stores channel ``c``'s ``g``
    values at ``A[base + c * whole + i]``: an 8 x 16 transpose in three rounds of two-source shuffles
    (pairs of positions, then quads, then octets: 24 shuffles), then two 8-lane stores per result, masked
    to ``g`` lanes. It replaced 32 x ``g`` scalar moves: 172-216 -> 217-230 GMAC/s on 3x3 layers with
    64-512 input channels."""
    g = len(vecs)
    vi = vecs[0].type
    zero = ir.Constant(vi, [0] * LANES)
    rows = vecs + [zero] * (MAX_RUN - g)

    def shuffle(x, y, idx):
        return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, LANES), idx))

    # round 1: positions (2m, 2m+1) interleaved per channel: lo = channels 0..7, hi = channels 8..15
    lo1 = [c // 2 + (LANES if c % 2 else 0) for c in range(LANES)]
    hi1 = [8 + c // 2 + (LANES if c % 2 else 0) for c in range(LANES)]
    pairs = [
        (shuffle(rows[2 * m], rows[2 * m + 1], lo1), shuffle(rows[2 * m], rows[2 * m + 1], hi1))
        for m in range(4)
    ]
    # each pair vector: lanes [2c, 2c+1] = positions (2m, 2m+1) of channel c (8 channels)
    # round 2: quads: lanes [4c .. 4c+3] = positions 4n..4n+3 of channel c (4 channels per vector)
    lo2 = [(c // 4) * 2 + (c % 2) + (LANES if (c % 4) >= 2 else 0) for c in range(LANES)]
    hi2 = [8 + v for v in lo2]
    quads = []
    for n in range(2):
        for h in range(2):
            x, y = pairs[2 * n][h], pairs[2 * n + 1][h]
            quads.append((shuffle(x, y, lo2), shuffle(x, y, hi2)))
    # quads[2n + h] = (channels 8h..8h+3, channels 8h+4..8h+7) for positions 4n..4n+3
    # round 3: octets: lanes [8c .. 8c+7] = positions 0..7 of channel c (2 channels per vector)
    lo3 = [(c // 8) * 4 + (c % 4) + (LANES if (c % 8) >= 4 else 0) for c in range(LANES)]
    hi3 = [8 + v for v in lo3]
    v8 = ir.VectorType(_I32, 8)
    mask = ir.Constant(ir.VectorType(ir.IntType(1), 8), [i < g for i in range(8)])
    store = builder.module.globals.get("llvm.masked.store.v8i32.p0v8i32")
    if store is None:
        fty = ir.FunctionType(ir.VoidType(), [v8, v8.as_pointer(), _I32, mask.type])
        store = ir.Function(builder.module, fty, name="llvm.masked.store.v8i32.p0v8i32")
    for h in range(2):
        for q in range(2):
            x, y = quads[h][q], quads[2 + h][q]  # positions 0..3 and 4..7 of 4 channels
            for half, idx in enumerate((lo3, hi3)):
                both = shuffle(x, y, idx)  # 2 channels x 8 positions
                for k in range(2):
                    c = 8 * h + 4 * q + 2 * half + k
                    row = builder.shuffle_vector(both, both, ir.Constant(v8, [8 * k + j for j in range(8)]))
                    at = builder.add(base, builder.mul(whole, _c64(c)))
                    ptr = builder.bitcast(builder.gep(ap, [at]), v8.as_pointer())
                    builder.call(store, [row, ptr, _I32(4), mask])


@cache
def _run_sums(g: int):
    """Intrinsic ``(arrays, ints)``: ``arrays = (offs, wv, X, A)``, ``ints = (k0, k1, p, base, whole)``;
    the sums of the entries ``[k0, k1)`` for positions ``p .. p + g - 1`` into ``A[base + c * whole + i]``
    (channel ``c`` of the block, position ``i`` of the run)."""
    vi = ir.VectorType(_I32, LANES)

    @intrinsic
    def sums(typingctx, arrays, ints):
        def codegen(context, builder, signature, args):
            op, wp, xp, ap = _unpack(context, builder, signature.args[0], args[0])
            k0, k1, p, base, whole = _ints(builder, args[1], 5)
            dot = _dot4(builder, "vnni512", vi)
            zero = ir.Constant(vi, [0] * LANES)
            xbase = builder.gep(xp, [p])

            def body(k, accs):
                row = builder.gep(xbase, [builder.sext(builder.load(builder.gep(op, [k])), ir.IntType(64))])
                at = builder.mul(k, _c64(BLOCK))
                ws = [_vload(builder, wp, builder.add(at, _c64(LANES * j)), vi) for j in range(2)]
                out = []
                for i in range(g):
                    x = _splat(builder, builder.load(builder.gep(row, [_c64(i)])), vi)
                    out += [dot(accs[2 * i + j], x, ws[j]) for j in range(2)]
                return out

            accs = emit_loop(builder, k0, k1, [zero] * (2 * g), body, "chan")
            for j in range(2):  # channels 16j .. 16j + 15
                at = builder.add(base, builder.mul(whole, _c64(LANES * j)))
                _transpose_store(builder, [accs[2 * i + j] for i in range(g)], ap, at, whole)
            return context.get_dummy_value()

        return types.void(arrays, ints), codegen

    return sums


_S1, _S2, _S3, _S4, _S5, _S6, _S7, _S8 = (_run_sums(g) for g in range(1, MAX_RUN + 1))


@_jit(fastmath=False)
def channel_sums(ptr, offs, wv, X, A, starts, lens, whole, b0, b1):
    """Blocks ``[b0, b1)`` of 32 output channels: ``A[co * whole + p]`` = the exact int32 sums of output
    channel ``co`` at every position ``p`` of the runs (``starts``, ``lens``)."""
    for b in range(b0, b1):
        k0, k1 = ptr[b], ptr[b + 1]
        for s in range(starts.size):
            p, g = starts[s], lens[s]
            args, ints = (offs, wv, X, A), (k0, k1, p, b * BLOCK * whole + p, whole)
            if g == 8:
                _S8(args, ints)
            elif g == 7:
                _S7(args, ints)
            elif g == 6:
                _S6(args, ints)
            elif g == 5:
                _S5(args, ints)
            elif g == 4:
                _S4(args, ints)
            elif g == 3:
                _S3(args, ints)
            elif g == 2:
                _S2(args, ints)
            else:
                _S1(args, ints)


class ChannelSums:
    """The exact int32 sums of one int8 convolution, channels in the lanes, into whole accumulators ``acc``
    (``whole`` per output channel, positions ``y * pitch + x`` of the output layout ``dest``; positions
    outside the map stay 0) for ``DirectConvI8``'s epilogue."""

    def __init__(
        self, wq: np.ndarray, inp: L.Layout, geom, dest: L.Layout, isa: str, *, ntiles: int, tile: int
    ):
        if isa != "vnni512":
            raise PrunekitError(f"channel-lane sums need isa 'vnni512' (vpdpbusd), got {isa!r}")
        self.ptr, self.offs, self.wv = pack_channel_blocks(wq, inp, geom)
        self.starts, self.lens = runs(dest.height, dest.width, dest.pitch)
        self.whole = ntiles * tile + 16
        self.nblocks = self.ptr.size - 1
        self.acc = np.zeros(self.nblocks * BLOCK * self.whole, np.int32)
        self.dots = int(self.wv.size)  # 4-byte dot products per output position
        self._parts: dict[int, list[tuple]] = {}

    def __call__(self, X: np.ndarray, n: int) -> None:
        """The sums on ``X`` (the input layout's int32 units), over ``n`` threads."""
        parts = self._parts.get(n)
        if parts is None:
            cuts = threads.even_splits(self.nblocks, n, align=1)
            parts = list(zip(cuts, cuts[1:]))
            self._parts[n] = parts
        common = (self.ptr, self.offs, self.wv, X, self.acc, self.starts, self.lens, self.whole)
        threads.run(channel_sums, [(*common, b0, b1) for b0, b1 in parts])
