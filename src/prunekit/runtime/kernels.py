"""Numba kernels: sparse weight (CSR) times dense activations, float32 and int8, and the int8 glue.

Importing this module imports numba but compiles nothing: every kernel is compiled on its first call (and
cached on disk when a writable cache directory exists, see :func:`_jit`). Kernels are pure: arrays in,
arrays out, no torch. Two layouts:

* ``rows``: ``y[i, r] = sum_k vals[k] * x[i, idx[k]]`` (one CSR row per output, the activations gathered).
  For batch 1 this is memory- and load-bound; unsigned 64-bit loop counters and indices matter here: with
  signed ones LLVM keeps sign-extension and wraparound checks in the inner loop (about 3x slower, measured).
* ``xt``: ``yT[r, :] = sum_k vals[k] * xT[idx[k], :]`` with the activations transposed (in x P), so each
  nonzero multiplies one contiguous row: vectorises across P (the batch, or N*Hout*Wout for im2col).
  The row tile's accumulators stay in vector registers through the LLVM intrinsic :func:`row_tile`.
  The CSR may be split into column blocks of ``kb`` inputs so the slice of ``xT`` in use stays in cache.

The LLVM intrinsic lives in this file, not a module of its own, on purpose: numba's disk cache is keyed on
the source file of the cached function, so an intrinsic edited in another file could be served stale.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, register_jitable

from prunekit.quant import rounding

# the one requantization rule, compiled from its own source (prunekit.quant.rounding) wherever a kernel
# calls it: no copy of the arithmetic here
register_jitable(rounding.rshift_round)
register_jitable(rounding.requantize_value)

log = logging.getLogger(__name__)


def _jit(fastmath: bool = True, cache: bool = True, **extra) -> Callable:
    """``numba.njit`` with ``cache=True`` when a cache location is writable, without it otherwise.

    numba looks for a writable ``__pycache__`` next to this file, then a per-user cache directory; when
    neither works it raises at decoration time, which must never break ``import``. ``PRUNEKIT_NUMBA_CACHE=0``
    turns the disk cache off. ``cache=False`` for a kernel that calls code from another file (numba's cache
    is keyed on this file only, so an edit there would be served stale).
    """

    def wrap(fn: Callable) -> Callable:
        opts = dict(nogil=True, boundscheck=False, fastmath=fastmath, **extra)
        if cache and os.environ.get("PRUNEKIT_NUMBA_CACHE", "1") != "0":
            try:
                return numba.njit(cache=True, **opts)(fn)
            except Exception as exc:  # noqa: BLE001 - any cache failure means: run uncached
                log.info("numba disk cache unavailable for %s (%s); compiling in memory", fn.__name__, exc)
        return numba.njit(**opts)(fn)

    return wrap


# -- the LLVM row tile ------------------------------------------------------------------------------------
_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_V8F = ir.VectorType(_F32, 8)
_ZERO = ir.Constant(_V8F, [0.0] * 8)
# numba's fastmath pass gives every float op that has no flags all of them; an op given these keeps them
_NO_REASSOC = ("nnan", "ninf", "nsz", "arcp", "contract", "afn")


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    found = builder.module.globals.get(name)
    return found if found is not None else ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _to_f32(builder: ir.IRBuilder, value: ir.Value, nbtype: types.Type) -> ir.Value:
    if isinstance(nbtype, types.Float):
        return value if nbtype.bitwidth == 32 else builder.fptrunc(value, _F32)
    return builder.sitofp(value, _F32) if nbtype.signed else builder.uitofp(value, _F32)


def _to_i64(builder: ir.IRBuilder, value: ir.Value, nbtype: types.Integer) -> ir.Value:
    if nbtype.bitwidth == 64:
        return value
    return builder.sext(value, _I64) if nbtype.signed else builder.zext(value, _I64)


def emit_loop(
    builder: ir.IRBuilder, lo: ir.Value, hi: ir.Value, carried: list, body: Callable, name: str = "tile"
) -> list:
    """Emit ``for k in [lo, hi): carried = body(k, carried)``; return the final carried values (the LLVM
    loop every hand-written kernel here uses: runtime.kernels, conv_kernels, gemv_kernels)."""
    pre = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed("<", lo, hi), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(_I64)
    phis = [builder.phi(v.type) for v in carried]
    k.add_incoming(lo, pre)
    for p, v in zip(phis, carried):
        p.add_incoming(v, pre)
    new = body(k, list(phis))
    k2 = builder.add(k, ir.Constant(_I64, 1))
    end = builder.block
    k.add_incoming(k2, end)
    for p, v in zip(phis, new):
        p.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", k2, hi), loop, done)
    builder.position_at_end(done)
    out = []
    for v, n in zip(carried, new):  # all phis first: LLVM wants them grouped at the top of the block
        res = builder.phi(v.type)
        res.add_incoming(v, pre)
        res.add_incoming(n, end)
        out.append(res)
    return out


@cache
def row_tile(nv: int, unroll: int, accumulate: bool, with_bias: bool = False):
    """Intrinsic ``(idx, vals, start, stop, x, ldx, j0, y, y_off)`` for one row and ``8 * nv`` columns::

        y[y_off : y_off + 8 nv] (+)= sum_{k in [start, stop)} vals[k] * x.flat[idx[k] * ldx + j0 : ... + 8 nv]

    ``with_bias`` adds two arguments ``(bias, r)`` and stores ``(old +) sum + bias[r]``: the bias added last,
    in its own rounding (as a separate pass would), never reassociated into the sum.

    A plain numba loop would keep these accumulators in memory (LLVM cannot prove ``y`` and ``x`` do not
    alias): a store-to-load round trip per nonzero. Here they are SSA ``<8 x float>`` values. ``unroll``
    interleaves that many independent streams of the row's nonzeros: with one vector per tile a single FMA
    chain is latency-bound. Only target-independent LLVM operations are used (vector loads, llvm.fma).
    """

    def declare(typingctx, idx, vals, start, stop, x, ldx, j0, y, y_off, *extra):
        sig = types.void(idx, vals, start, stop, x, ldx, j0, y, y_off, *extra)

        def codegen(context, builder, signature, args):
            ia, va, start, stop, xa, ldx, j0, ya, y_off = args[:9]
            it, vt, _, _, xt, _, _, yt, _ = signature.args[:9]
            if with_bias:
                bp = context.make_array(signature.args[9])(context, builder, args[9]).data
                b = builder.load(builder.gep(bp, [args[10]]))
                one = builder.insert_element(ir.Constant(_V8F, ir.Undefined), b, ir.Constant(_I32, 0))
                bvec = builder.shuffle_vector(
                    one, ir.Constant(_V8F, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
                )
            ip = context.make_array(it)(context, builder, ia).data
            vp = context.make_array(vt)(context, builder, va).data
            xp = context.make_array(xt)(context, builder, xa).data
            yp = context.make_array(yt)(context, builder, ya).data
            fma = _declare(builder, "llvm.fma.v8f32", _V8F, [_V8F, _V8F, _V8F])
            splat = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
            xcol = builder.gep(xp, [j0])

            def axpy(k: ir.Value, accs: list) -> list:
                col = _to_i64(builder, builder.load(builder.gep(ip, [k])), it.dtype)
                v = _to_f32(builder, builder.load(builder.gep(vp, [k])), vt.dtype)
                one = builder.insert_element(ir.Constant(_V8F, ir.Undefined), v, ir.Constant(_I32, 0))
                vb = builder.shuffle_vector(one, ir.Constant(_V8F, ir.Undefined), splat)
                row = builder.gep(xcol, [builder.mul(col, ldx)])
                out = []
                for i, acc in enumerate(accs):
                    load = builder.load(
                        builder.bitcast(builder.gep(row, [ir.Constant(_I64, 8 * i)]), _V8F.as_pointer())
                    )
                    load.align = 4
                    out.append(builder.call(fma, [load, vb, acc]))
                return out

            m = builder.sdiv(builder.sub(stop, start), ir.Constant(_I64, unroll))

            def streams(t: ir.Value, accs: list) -> list:
                out = []
                for s in range(unroll):
                    k = builder.add(builder.add(start, builder.mul(m, ir.Constant(_I64, s))), t)
                    out += axpy(k, accs[s * nv : (s + 1) * nv])
                return out

            accs = emit_loop(builder, ir.Constant(_I64, 0), m, [_ZERO] * (nv * unroll), streams)
            tail = builder.add(start, builder.mul(m, ir.Constant(_I64, unroll)))
            accs[:nv] = emit_loop(builder, tail, stop, accs[:nv], axpy)
            for i in range(nv):
                total = accs[i]
                for s in range(1, unroll):
                    total = builder.fadd(total, accs[s * nv + i])
                ptr = builder.bitcast(
                    builder.gep(yp, [builder.add(y_off, ir.Constant(_I64, 8 * i))]), _V8F.as_pointer()
                )
                if accumulate:
                    old = builder.load(ptr)
                    old.align = 4
                    total = builder.fadd(old, total)
                if with_bias:
                    total = builder.fadd(total, bvec, flags=_NO_REASSOC)
                store = builder.store(total, ptr)
                store.align = 4
            return context.get_dummy_value()

        return sig, codegen

    if with_bias:

        @intrinsic
        def _row_tile_bias(typingctx, idx, vals, start, stop, x, ldx, j0, y, y_off, bias, r):
            return declare(typingctx, idx, vals, start, stop, x, ldx, j0, y, y_off, bias, r)

        return _row_tile_bias

    @intrinsic
    def _row_tile(typingctx, idx, vals, start, stop, x, ldx, j0, y, y_off):
        return declare(typingctx, idx, vals, start, stop, x, ldx, j0, y, y_off)

    return _row_tile


@cache
def transpose_tile(with_bias: bool):
    """Intrinsic ``(src, s_off, lds, dst, d_off, ldd, bias, b_off)``: an 8x8 float32 block transposed,
    ``dst[d_off + j*ldd + i] = src[s_off + i*lds + j] (+ bias[b_off + i])``, in registers (the usual
    unpack / shuffle / 128-bit permute network). A scalar strided copy runs at about 1 ns per element here,
    as long as the sparse product itself for a batch of 64; this is about ten times faster."""

    def shuffle(builder, a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 8), mask))

    @intrinsic
    def _transpose(typingctx, src, s_off, lds, dst, d_off, ldd, bias, b_off):
        sig = types.void(src, s_off, lds, dst, d_off, ldd, bias, b_off)

        def codegen(context, builder, signature, args):
            sa, so, lds, da, do, ldd, ba, bo = args
            st, _, _, dt, _, _, bt, _ = signature.args
            sp = context.make_array(st)(context, builder, sa).data
            dp = context.make_array(dt)(context, builder, da).data
            rows = []
            for i in range(8):
                off = builder.add(so, builder.mul(lds, ir.Constant(_I64, i)))
                load = builder.load(builder.bitcast(builder.gep(sp, [off]), _V8F.as_pointer()))
                load.align = 4
                rows.append(load)
            lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
            t = []
            for i in range(0, 8, 2):
                t += [shuffle(builder, rows[i], rows[i + 1], lo), shuffle(builder, rows[i], rows[i + 1], hi)]
            q0, q1 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
            u = []
            for a, b in ((0, 2), (1, 3), (4, 6), (5, 7)):
                u += [shuffle(builder, t[a], t[b], q0), shuffle(builder, t[a], t[b], q1)]
            # u[k], k < 4: column k of rows 0-3 (low lanes) and column k+4 (high lanes); u[k+4]: rows 4-7
            p0, p1 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
            order = [shuffle(builder, u[k], u[k + 4], p0) for k in (0, 1, 2, 3)]
            order += [shuffle(builder, u[k], u[k + 4], p1) for k in (0, 1, 2, 3)]
            if with_bias:
                bp = context.make_array(bt)(context, builder, ba).data
                bvec = builder.load(builder.bitcast(builder.gep(bp, [bo]), _V8F.as_pointer()))
                bvec.align = 4
                order = [builder.fadd(c, bvec) for c in order]
            for j, col in enumerate(order):
                off = builder.add(do, builder.mul(ldd, ir.Constant(_I64, j)))
                store = builder.store(col, builder.bitcast(builder.gep(dp, [off]), _V8F.as_pointer()))
                store.align = 4
            return context.get_dummy_value()

        return sig, codegen

    return _transpose


_T64, _T64_ACC = row_tile(8, 1, False), row_tile(8, 1, True)  # 64 columns: 8 chains are enough
_T8, _T8_ACC = row_tile(1, 4, False), row_tile(1, 4, True)  # 8 columns: 4 streams hide the FMA latency
_T64_B, _T64_ACC_B = row_tile(8, 1, False, True), row_tile(8, 1, True, True)  # + bias, in the last block
_T8_B, _T8_ACC_B = row_tile(1, 4, False, True), row_tile(1, 4, True, True)


# -- kernels ----------------------------------------------------------------------------------------------
@_jit()
def csr_rows(indptr, idx, vals, x, bias, y, r0, r1):
    """``y[i, r] = bias[r] + sum_k vals[k] * x[i, idx[k]]`` for output rows ``r`` in ``[r0, r1)``."""
    for i in range(y.shape[0]):
        for r in range(r0, r1):
            acc = np.float32(0.0)
            for k in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
                acc += np.float32(vals[k]) * x[i, np.uint64(idx[k])]
            y[i, r] = acc + bias[r]


@_jit()
def csr_xt(indptr, idx, vals, kb, xT, yT, bias, has_bias, r0, r1):
    """``yT[r, :] = sum_k vals[k] * xT[b*kb + idx[k], :] (+ bias[r])`` over column blocks ``b``, for output
    rows ``r`` in ``[r0, r1)`` (``indptr``: blocks x rows+1 global offsets, ``idx`` local to the block).
    ``xT`` needs unit column stride, ``yT`` C order. Column tiles of 64, then 8, then scalar (32-wide tiles
    were measured slower than 64 at every size here). The bias is added after the last block's sums, so
    the result equals the unbiased one plus the bias in a separate pass, bit for bit."""
    nb = indptr.shape[0]
    p = xT.shape[1]
    ldx = np.int64(xT.strides[0] // 4)
    ldy = np.int64(yT.strides[0] // 4)
    p64 = p // 64 * 64
    p8 = p // 8 * 8
    for b in range(nb):  # all rows of one block before the next: that block's slice of xT stays cached
        xb = xT[b * kb :]
        ptr = indptr[b]
        add = has_bias and b == nb - 1
        for j in range(0, p64, 64):
            for r in range(r0, r1):
                lo, hi, col, yo, ri = ptr[r], ptr[r + 1], np.int64(j), np.int64(r * ldy + j), np.int64(r)
                if b == 0:
                    if add:
                        _T64_B(idx, vals, lo, hi, xb, ldx, col, yT, yo, bias, ri)
                    else:
                        _T64(idx, vals, lo, hi, xb, ldx, col, yT, yo)
                elif add:
                    _T64_ACC_B(idx, vals, lo, hi, xb, ldx, col, yT, yo, bias, ri)
                else:
                    _T64_ACC(idx, vals, lo, hi, xb, ldx, col, yT, yo)
        for j in range(p64, p8, 8):
            for r in range(r0, r1):
                lo, hi, col, yo, ri = ptr[r], ptr[r + 1], np.int64(j), np.int64(r * ldy + j), np.int64(r)
                if b == 0:
                    if add:
                        _T8_B(idx, vals, lo, hi, xb, ldx, col, yT, yo, bias, ri)
                    else:
                        _T8(idx, vals, lo, hi, xb, ldx, col, yT, yo)
                elif add:
                    _T8_ACC_B(idx, vals, lo, hi, xb, ldx, col, yT, yo, bias, ri)
                else:
                    _T8_ACC(idx, vals, lo, hi, xb, ldx, col, yT, yo)
        for r in range(r0, r1):
            for j in range(p8, p):
                acc = np.float32(0.0) if b == 0 else yT[r, j]
                for k in range(ptr[r], ptr[r + 1]):
                    acc += np.float32(vals[k]) * xb[np.int64(idx[k]), j]
                yT[r, j] = acc + bias[r] if add else acc


@_jit()
def csr_xt_images(indptr, idx, vals, kb, cols, y, bias, has_bias, r0, r1):
    """:func:`csr_xt` image by image: ``cols`` (N, K, L) and ``y`` (N, out, L), both C order. Convolutions
    in NCHW need no permuted copies this way, but each image only has L = Hout*Wout columns to tile."""
    for n in range(cols.shape[0]):
        csr_xt(indptr, idx, vals, kb, cols[n], y[n], bias, has_bias, r0, r1)


_TR, _TR_BIAS = transpose_tile(False), transpose_tile(True)


@_jit()
def transpose(src, dst, bias, has_bias, i0, i1):
    """``dst[:, i] = src[i, :] (+ bias[i])`` for source rows ``i`` in ``[i0, i1)`` (``i0`` a multiple of 16),
    float32, C order: 8x8 register tiles, scalar edges."""
    n, m = src.shape
    lds = np.int64(src.strides[0] // 4)
    ldd = np.int64(dst.strides[0] // 4)
    n8, m8 = min(i1, n // 8 * 8), m // 8 * 8
    for g in range(i0, n8, 16):
        # two 8-row tiles per destination line: each 64-byte line is written whole while it is in L1
        # (with power-of-two strides the destination lines alias the same few sets and get evicted)
        for j0 in range(0, m8, 8):
            for a in range(g, min(g + 16, n8), 8):
                so, do = np.int64(a * lds + j0), np.int64(j0 * ldd + a)
                if has_bias:
                    _TR_BIAS(src, so, lds, dst, do, ldd, bias, np.int64(a))
                else:
                    _TR(src, so, lds, dst, do, ldd, bias, np.int64(0))
    for i in range(i0, i1):  # the edges: rows past the last full tile, columns past m8
        lo = m8 if i < n8 else 0
        for j in range(lo, m):
            dst[j, i] = src[i, j] + bias[i] if has_bias else src[i, j]


# Abramowitz & Stegun 7.1.28: erf(z) = 1 - (1 + a1 z + ... + a6 z^6)^-16 for z >= 0, |error| <= 3e-7; only
# multiply-adds and one division, so LLVM vectorises it (libm's erff is a scalar call)
_ERF = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


# no ZeroDivisionError check in the loop (it would stop the vectorisation); fast-math without `nnan` and
# `ninf`, so the compiler keeps IEEE infinities and NaN, which the edge cases below depend on
@_jit(error_model="numpy", fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def gelu(a, i0, i1):
    """``a[i] = a[i] * Phi(a[i])`` (the exact-erf GELU, erf to within 3e-7) in place for ``i`` in
    ``[i0, i1)`` of a 1-D float32 array. Written as ``0.5 (x + |x| erf(|x| / sqrt 2))``: no branch, so it
    vectorises (torch's GELU takes about 1 ns per element on one core here). At the edges it gives the
    limits of ``x Phi(x)``: GELU(+inf) = +inf, GELU(-inf) = 0, GELU(NaN) = NaN."""
    c1, c2, c3 = np.float32(_ERF[0]), np.float32(_ERF[1]), np.float32(_ERF[2])
    c4, c5, c6 = np.float32(_ERF[3]), np.float32(_ERF[4]), np.float32(_ERF[5])
    inv_sqrt2, half, one = np.float32(0.7071067811865476), np.float32(0.5), np.float32(1.0)
    top, zero, minus_inf = np.float32(6.0), np.float32(0.0), np.float32(-np.inf)
    for i in range(np.uint64(i0), np.uint64(i1)):  # unsigned: no negative-index wraparound in the loop
        x = a[i]
        ax = abs(x)
        z = min(ax * inv_sqrt2, top)  # erf(6) is 1 in float32; the clip keeps p**16 finite
        p = one + z * (c1 + z * (c2 + z * (c3 + z * (c4 + z * (c5 + z * c6)))))
        p2 = p * p
        p4 = p2 * p2
        p8 = p4 * p4
        q = one / (p8 * p8) if z < top else zero  # erfc(z)
        y = half * (x + ax * (one - q))  # not ax - ax*q: inf * 0 would turn GELU(+inf) into NaN
        a[i] = y if x != minus_inf else zero  # -inf + inf is NaN; the limit is 0 (NaN != -inf: kept)


# -- int8 glue: no fastmath, these must round exactly like prunekit.quant.layers -------------------------
@_jit(fastmath=False)
def dynamic_scale(x):
    """``max|x| / 127`` in float32, 1 when ``x`` is all zero (prunekit.quant.rounding.quantize_activation)."""
    top = np.float32(0.0)
    for v in x:
        a = abs(v)
        if a > top:
            top = a
    return top / np.float32(127.0) if top > 0 else np.float32(1.0)


@_jit(fastmath=False)
def quantize_into(x, scale, out):
    """``out = clamp(round_half_even(x / scale), -127, 127)`` as float32 (exact small integers)."""
    for i in range(x.size):
        q = np.rint(x[i] / scale)
        out[i] = min(max(q, np.float32(-127.0)), np.float32(127.0))


@_jit(fastmath=False)
def finish_int8(acc, s_x, weight_scale, bias, has_bias, y):
    """``y[n, r, l] = acc[n, r, l] * (s_x * weight_scale[r]) + bias[r]``: a float32 product, then a float32
    sum, never fused into an FMA, exactly as the reference ``_finish``."""
    nn_, nr, nl = acc.shape
    for n in range(nn_):
        for r in range(nr):
            scale = np.float32(s_x) * weight_scale[r]
            for j in range(nl):
                v = acc[n, r, j] * scale
                y[n, r, j] = v + bias[r] if has_bias else v


@_jit(fastmath=False, cache=False)  # calls prunekit.quant.rounding: see _jit
def finish_int8_requant(acc, bias_q, mult, shift, lo, hi, out_scale, y):
    """``y[n, r, l] = float32(requantize_value(acc[n, r, l] + bias_q[r], mult[r], shift[r], lo, hi)) *
    out_scale``: an int8 layer's integer output form (:mod:`prunekit.quant.rounding`), ``acc`` holding
    exact integers (float32)."""
    nn_, nr, nl = acc.shape
    for n in range(nn_):
        for r in range(nr):
            b, m, s = np.int64(bias_q[r]), np.int64(mult[r]), np.int64(shift[r])
            for j in range(nl):
                v = np.int64(acc[n, r, j]) + b
                y[n, r, j] = np.float32(rounding.requantize_value(v, m, s, lo, hi)) * out_scale


@_jit(fastmath=False, cache=False)  # calls prunekit.quant.rounding: see _jit
def int8_add(a, b, scales, consts, out):
    """prunekit.quant.glue.QuantizedAdd on flat float32 arrays: the integers of ``a`` and ``b`` recovered
    (float32 division, round half to even), ``rshift_round(qa * Ma + qb * Mb, sh)`` clamped to [-127, 127],
    written as ``float32(q) * scale_out``. ``scales``: (a, b, out) float32; ``consts``: (Ma, Mb, sh)."""
    sa, sb, so = scales[0], scales[1], scales[2]
    ma, mb, sh = consts[0], consts[1], consts[2]
    for i in range(a.size):
        qa = np.int64(np.rint(a[i] / sa))
        qb = np.int64(np.rint(b[i] / sb))
        q = rounding.rshift_round(qa * ma + qb * mb, sh)
        q = min(max(q, np.int64(-127)), np.int64(127))
        out[i] = np.float32(q) * so


@_jit(fastmath=False)
def quantize_dequantize(x, scale, out):
    """``out = float32(clamp(round_half_even(x / scale), -127, 127)) * scale`` (QuantizeInput)."""
    for i in range(x.size):
        q = min(max(np.rint(x[i] / scale), np.float32(-127.0)), np.float32(127.0))
        out[i] = q * scale


@_jit()
def direct_conv(x, indptr, taps, vals, bias, geom):
    """Direct sparse convolution (Park et al. 2017, "Faster CNNs with Direct Sparse Convolutions and Guided
    Pruning"): no im2col. ``x`` (N, C, H, W) C-ordered float32 is zero-padded once into a fresh buffer;
    ``indptr``/``vals`` is the weight as CSR over output channels and ``taps`` (3, nnz) uint64 holds each
    nonzero's input channel and its ``kh*dilation_h``, ``kw*dilation_w`` offsets, so
    ``y[n, co, oy, ox] = bias[co] + sum_k vals[k] * xpad[n, chan[k], oy*sh + dy[k], ox*sw + dx[k]]``.
    ``geom`` (int64): padding h, w, stride h, w, output h, w, has_bias (few arguments: numba's dispatch
    costs per argument). Stride 1 runs each nonzero as one contiguous multiply-add over the output's span
    in the padded layout (``(ho-1)*Wpad + wo`` values, accumulated per output channel in a small buffer,
    vectorised); other strides loop over ``oy`` then ``ox``. Returns the (N, Cout, ho, wo) float32 output."""
    n, c, h, w = x.shape
    ph, pw, sh, sw, ho, wo = geom[0], geom[1], geom[2], geom[3], geom[4], geom[5]
    has_bias = geom[6] != 0
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=np.float32)
    for i in range(n):
        for ci in range(c):
            for r in range(h):
                for q in range(w):
                    xp[i, ci, ph + r, pw + q] = x[i, ci, r, q]
    cout = indptr.shape[0] - 1
    y = np.empty((n, cout, ho, wo), dtype=np.float32)
    xf = xp.reshape(-1)
    yf = y.reshape(-1)
    wp = np.uint64(w + 2 * pw)
    plane = np.uint64(h + 2 * ph) * wp
    hw = np.uint64(ho * wo)
    uho, uwo, ush, usw = np.uint64(ho), np.uint64(wo), np.uint64(sh), np.uint64(sw)
    uc, ucout = np.uint64(c), np.uint64(cout)
    chan, dy, dx = taps[0], taps[1], taps[2]
    one = np.uint64(1)
    span = (uho - one) * wp + uwo if ho > 0 and wo > 0 else np.uint64(0)
    acc = np.empty(span, dtype=np.float32)
    for i in range(np.uint64(n)):
        xi = i * uc * plane
        for co in range(ucout):
            yo = (i * ucout + co) * hw
            b = bias[co] if has_bias else np.float32(0.0)
            lo, hi = np.uint64(indptr[co]), np.uint64(indptr[co + 1])
            if sh == 1 and sw == 1:
                for p in range(span):
                    acc[p] = 0.0
                for k in range(lo, hi):
                    v = vals[k]
                    base = xi + chan[k] * plane + dy[k] * wp + dx[k]
                    for p in range(span):
                        acc[p] += v * xf[base + p]
                for oy in range(uho):
                    for ox in range(uwo):
                        yf[yo + oy * uwo + ox] = acc[oy * wp + ox] + b
            else:
                for p in range(hw):
                    yf[yo + p] = b
                for k in range(lo, hi):
                    v = vals[k]
                    base = xi + chan[k] * plane + dy[k] * wp + dx[k]
                    for oy in range(uho):
                        src = base + oy * ush * wp
                        dst = yo + oy * uwo
                        for ox in range(uwo):
                            yf[dst + ox] += v * xf[src + ox * usw]
    return y
