"""Direct sparse convolution kernels for real feature maps: float32 and int8 (4-channel blocks), numba +
LLVM intrinsics, with the vector width and the int8 dot product picked at run time.

The method: Park et al. 2017, "Faster CNNs with Direct Sparse Convolutions and Guided Pruning" (no im2col:
each nonzero weight ``(co, ci, i, j)`` is an offset into the input), with the register tiling of Elsen et
al. 2020, "Fast Sparse ConvNets" (spatial positions play the role of the batch: each nonzero multiplies a
whole vector of output pixels). The input lives in a layout of aligned planes
(:mod:`prunekit.runtime.conv_layout`) in which every tap of every output position is one *aligned* vector
load at ``X[offset + p]`` for a tile of ``T = nv * vw`` consecutive output positions ``p``; unaligned
loads split cache lines and measured 30% slower (35 against 50 GMAC/s on an AMD EPYC Zen 4 core).

Loops (one kernel call = one layer): spatial tile, then input-channel block (so the block's input rows
stay in L1), then output channel (float32) or group of 4 output channels (int8). Partial sums of a tile
go to a scratch array between channel blocks. The last block runs the fused epilogue and stores the
output into every shifted plane its consumers read (``yoffs``: one offset per plane, ``M``: a 0/1 mask
per plane that zeroes padding and the lanes that would wrap into the neighbouring row).

* float32 (:func:`conv_f32`): ``y = sum + bias (+ residual)``, clamped to ``[lo, hi]`` (ReLU, ReLU6 or
  nothing). One offset load, one broadcast and ``nv`` FMAs with a memory operand per nonzero.
* int8 (:func:`conv_i8`): weights in blocks of 4 consecutive input channels at one (co, i, j), the
  activations 4 channels per 32-bit lane, so one ``vpdpbusd`` (AVX-512 VNNI: u8 x s8, 4 products per lane)
  handles a block for 16 positions. Without VNNI: ``vpmaddubsw`` + ``vpmaddwd`` by ones (AVX2), exact
  while activations are in 0..127 (2 * 127 * 127 < 2**15: no saturation); inputs offset by +128 would
  saturate there, so a signed input on AVX2 is refused (the layer stays dense). Accumulators are exact
  int32; :func:`int8_epilogue` then applies THE requantization rule, in one place.
* int8, the integer chain (``FLAG_CHAIN``, where ``conv.chain_reason`` allows it: an integer model, a ReLU
  or no clamp, one scale per value): the same integers without the float32 detour. The float spelling
  computes ``y = float32(q) * s`` and the next step recovers ``round(y / s) = q`` (a division per value,
  per operand of a fused add); the chain keeps ``q``: requantization, the fused add on the residual's
  *bytes* (:func:`residual_byte`, :func:`int8_add_integers`), the ReLU as ``max(q, 0)``, the bytes. Float32
  is written only where a torch step reads it.

numba caches a kernel on disk only for module-level functions, so the register-tile sizes are a fixed set
of variants dispatched at run time (``nv`` is one branch per row and tile, outside the inner loop), and
the intrinsics live in this file (numba's cache is keyed on the source file).
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
from numba.extending import intrinsic

from prunekit.runtime.kernels import emit_loop

log = logging.getLogger(__name__)

# register tiles (vectors per tile) compiled for each vector width; compile() times a few of them per layer
NV16 = (2, 4, 7, 8)
NV8 = (4, 7, 8, 14)
T_MAX = 128  # the largest tile in positions (layouts leave this much slack after each plane)

_F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _jit(fastmath: bool = True) -> Callable:
    """``numba.njit`` (nogil, no bounds checks) cached on disk when a cache directory is writable."""

    def wrap(fn: Callable) -> Callable:
        opts = dict(nogil=True, boundscheck=False, fastmath=fastmath)
        if os.environ.get("PRUNEKIT_NUMBA_CACHE", "1") != "0":
            try:
                return numba.njit(cache=True, **opts)(fn)
            except Exception as exc:  # noqa: BLE001 - any cache failure means: run uncached
                log.info("numba disk cache unavailable for %s (%s); compiling in memory", fn.__name__, exc)
        return numba.njit(**opts)(fn)

    return wrap


# -- LLVM helpers ------------------------------------------------------------------------------------------
def _c64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    found = builder.module.globals.get(name)
    return found if found is not None else ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _splat(builder: ir.IRBuilder, value: ir.Value, vt: ir.VectorType) -> ir.Value:
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count)
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined), mask)


def _vload(builder: ir.IRBuilder, base: ir.Value, off: ir.Value, vt: ir.VectorType) -> ir.Value:
    load = builder.load(builder.bitcast(builder.gep(base, [off]), vt.as_pointer()))
    load.align = 4
    return load


def _vstore(builder: ir.IRBuilder, value: ir.Value, base: ir.Value, off: ir.Value) -> None:
    store = builder.store(value, builder.bitcast(builder.gep(base, [off]), value.type.as_pointer()))
    store.align = 4


def _data(context, builder, nbtype, value) -> ir.Value:
    return context.make_array(nbtype)(context, builder, value).data


def _flag(builder: ir.IRBuilder, flags: ir.Value, bit: int) -> ir.Value:
    return builder.icmp_unsigned("!=", builder.and_(flags, _c64(1 << bit)), _c64(0))


def _store_planes(builder, vt, value, yp, ybase, yoffs_p, ns, mp, mb, ml, combine) -> None:
    """For each output plane s < ns: ``Y[ybase + yoffs[s] + lane] = combine(value, M[mb + s*ml + lane])``."""

    def body(s, _):
        dst = builder.add(ybase, builder.load(builder.gep(yoffs_p, [s])))
        mask = _vload(builder, mp, builder.add(mb, builder.mul(s, ml)), vt)
        _vstore(builder, combine(value, mask), yp, dst)
        return []

    emit_loop(builder, _c64(0), ns, [], body, "conv")


def _store_all(builder, vt, values, yp, yb, yoffs_p, ns, mp, mb, ml, combine) -> None:
    """:func:`_store_planes` for the ``nv`` vectors of a tile, with the common case of 3 planes (a 3-wide
    kernel's shifted copies) unrolled: the plane offsets loaded once, no loop per vector."""
    vw = vt.count
    with builder.if_else(builder.icmp_signed("==", ns, _c64(3))) as (three, other):
        with three:
            offs = [builder.load(builder.gep(yoffs_p, [_c64(k)])) for k in range(3)]
            for i, value in enumerate(values):
                at, mat = builder.add(yb, _c64(vw * i)), builder.add(mb, _c64(vw * i))
                for k in range(3):
                    mask = _vload(builder, mp, builder.add(mat, builder.mul(_c64(k), ml)), vt)
                    _vstore(builder, combine(value, mask), yp, builder.add(at, offs[k]))
        with other:
            for i, value in enumerate(values):
                at, mat = builder.add(yb, _c64(vw * i)), builder.add(mb, _c64(vw * i))
                _store_planes(builder, vt, value, yp, at, yoffs_p, ns, mp, mat, ml, combine)


# -- float32 ----------------------------------------------------------------------------------------------
FLAG_INIT, FLAG_FINAL, FLAG_RESID, FLAG_FLOAT_OUT, FLAG_BYTES_OUT, FLAG_INTEGER, FLAG_QADD = range(7)
FLAG_CHAIN = 7  # int8: the integer epilogue (conv.chain_reason), the residual read as bytes
FLAG_UNROLLED = 8  # int8 chain, 16 lanes, nv in SHARED_NV: the epilogue by _chain_epilogue (sums via S)
RQ_HEAD = 5  # rq: lo, hi, Ma, Mb, sh of a fused integer add, then RQ_STRIDE values per channel:
RQ_STRIDE = 5  # bias_q, mult, shift, and the integer chain's bound and float64 factor (conv.requant_f64)


def _unpack(context, builder, tuple_type, value) -> list:
    """The data pointers of a tuple of arrays."""
    return [
        _data(context, builder, t, builder.extract_value(value, i)) for i, t in enumerate(tuple_type.types)
    ]


def _ints(builder, value, n: int) -> list:
    return [builder.extract_value(value, i) for i in range(n)]


@cache
def _f32_tile(nv: int, vw: int):
    """Intrinsic ``(arrays, ints, bias)`` for one output row and one tile of ``nv`` vectors of ``vw``
    floats; ``arrays = (offs, vals, X, S, Y, yoffs, M, clamp, R)``, ``ints = (lo, hi, xb, sb, flags, yb,
    ns, mb, ml, rb)``::

        acc = (S[sb:] if INIT) + sum_{k in [lo, hi)} vals[k] * X[xb + offs[k] : ... + T]
        not FINAL: S[sb:] = acc
        FINAL:     t = clamp(acc + bias (+ R[rb:] if RESID)); Y[yb + yoffs[s] + :] = t * M[mb + s*ml + :]

    The accumulators are SSA vectors (a numba loop would keep them in memory: LLVM cannot prove that the
    output does not alias the input)."""
    vt = ir.VectorType(_F32, vw)

    @intrinsic
    def tile(typingctx, arrays, ints, bias):
        def codegen(context, builder, signature, args):
            op, vp, xp, sp, yp, yop, mp, cp, rp = _unpack(context, builder, signature.args[0], args[0])
            lo, hi, xb, sb, flags, yb, ns, mb, ml, rb = _ints(builder, args[1], 10)
            fma = _declare(builder, f"llvm.fma.v{vw}f32", vt, [vt, vt, vt])
            zero = ir.Constant(vt, [0.0] * vw)
            init = _flag(builder, flags, FLAG_INIT)
            accs = [
                builder.select(init, _vload(builder, sp, builder.add(sb, _c64(vw * i)), vt), zero)
                for i in range(nv)
            ]
            xbase = builder.gep(xp, [xb])

            def body(k, accs):
                row = builder.gep(xbase, [builder.sext(builder.load(builder.gep(op, [k])), _I64)])
                v = _splat(builder, builder.load(builder.gep(vp, [k])), vt)
                return [
                    builder.call(fma, [_vload(builder, row, _c64(vw * i), vt), v, a])
                    for i, a in enumerate(accs)
                ]

            accs = emit_loop(builder, lo, hi, accs, body, "conv")
            with builder.if_else(_flag(builder, flags, FLAG_FINAL)) as (final, partial):
                with final:
                    bv = _splat(builder, args[2], vt)
                    resid = _flag(builder, flags, FLAG_RESID)
                    lo_v = _splat(builder, builder.load(cp), vt)
                    hi_v = _splat(builder, builder.load(builder.gep(cp, [_c64(1)])), vt)
                    fmax = _declare(builder, f"llvm.maxnum.v{vw}f32", vt, [vt, vt])
                    fmin = _declare(builder, f"llvm.minnum.v{vw}f32", vt, [vt, vt])
                    outs = []
                    for i in range(nv):
                        t = builder.fadd(accs[i], bv)
                        r = _vload(builder, rp, builder.add(rb, _c64(vw * i)), vt)
                        t = builder.fadd(t, builder.select(resid, r, zero))
                        outs.append(builder.call(fmin, [builder.call(fmax, [t, lo_v]), hi_v]))
                    _store_all(builder, vt, outs, yp, yb, yop, ns, mp, mb, ml, builder.fmul)
                with partial:
                    for i in range(nv):
                        _vstore(builder, accs[i], sp, builder.add(sb, _c64(vw * i)))
            return context.get_dummy_value()

        return types.void(arrays, ints, bias), codegen

    return tile


_F16_2, _F16_4, _F16_7, _F16_8 = (_f32_tile(n, 16) for n in NV16)
_F8_4, _F8_7, _F8_8, _F8_14 = (_f32_tile(n, 8) for n in NV8)


@_jit()
def conv_f32(vw, nv, ptr, offs, vals, X, Y, yoffs, M, bias, clamp, R, S, geo):
    """One float32 sparse conv layer, output channels ``[geo[7], geo[8])`` (threads split them).

    ``ptr`` (channel blocks, cout + 1): CSR row pointers per input-channel block; ``offs`` (int32) /
    ``vals``: each nonzero's input offset and value. ``geo`` (int64): tiles, ybase, ystride (per output
    channel), planes ``ns``, mask length ``ml``, rbase, rstride, co0, co1, has_residual. ``S``: scratch of
    ``cout * T`` floats. The output row ``co``'s tile ``t`` goes to ``Y[ybase + co*ystride + yoffs[s] + p]``.
    """
    ntiles, ybase, ystride, ns, ml, rbase, rstride = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    co0, co1, has_r = geo[7], geo[8], geo[9]
    arrays = (offs, vals, X, S, Y, yoffs, M, clamp, R)
    T = np.int64(nv * vw)
    ncb = ptr.shape[0]
    for t in range(ntiles):
        p0 = np.int64(t * T)
        for b in range(ncb):
            pb = ptr[b]
            flags = np.int64(0)
            if b > 0:
                flags |= 1 << FLAG_INIT
            if b == ncb - 1:
                flags |= 1 << FLAG_FINAL
                if has_r:
                    flags |= 1 << FLAG_RESID
            for co in range(co0, co1):
                yb, rb = np.int64(ybase + co * ystride + p0), np.int64(rbase + co * rstride + p0)
                ints = (pb[co], pb[co + 1], p0, np.int64(co * T), flags, yb, ns, p0, ml, rb)
                if vw == 16:
                    if nv == 8:
                        _F16_8(arrays, ints, bias[co])
                    elif nv == 7:
                        _F16_7(arrays, ints, bias[co])
                    elif nv == 4:
                        _F16_4(arrays, ints, bias[co])
                    else:
                        _F16_2(arrays, ints, bias[co])
                elif nv == 14:
                    _F8_14(arrays, ints, bias[co])
                elif nv == 8:
                    _F8_8(arrays, ints, bias[co])
                elif nv == 7:
                    _F8_7(arrays, ints, bias[co])
                else:
                    _F8_4(arrays, ints, bias[co])


# -- int8 -------------------------------------------------------------------------------------------------
ISAS = ("vnni512", "avx2")


def int8_epilogue(builder: ir.IRBuilder, vf: ir.VectorType, acc: ir.Value, row: dict, integer) -> ir.Value:
    """THE int8 output of the sparse conv kernels (one place): exact int32 accumulators ``acc`` (vector) of
    one output channel -> its float32 output, in the layer's output form (``prunekit.quant.layers``):

    - integer (``integer`` true, a layer with ``out_scale``): the fixed-point requantization of
      :mod:`prunekit.quant.rounding`, ``y = float32(requantize_value(acc + comp + bias_q, M, sh, lo, hi)) *
      out_scale`` (:func:`requantize_vector`; ``scale`` holds ``out_scale``);
    - float: ``y = float32(acc + comp) * scale + bias`` (``scale = s_x * s_w[co]``, one product then one
      sum; LLVM never fuses them: the instructions carry no fast-math flags).

    ``comp`` undoes the +128 offset of a signed input (``-128 * sum_k q[co, k]``, 0 otherwise). ``row``:
    ``comp`` (i32), ``scale``, ``bias`` (f32), ``bias_q``, ``mult``, ``shift``, ``lo``, ``hi`` (i64) scalars
    of this channel. ``integer``: an i1."""
    n = vf.count
    vi = ir.VectorType(_I32, n)
    exact = builder.add(acc, _splat(builder, row["comp"], vi))
    with builder.if_else(integer) as (fixed, floating):
        with fixed:
            q = requantize_vector(
                builder, exact, row["bias_q"], row["mult"], row["shift"], row["lo"], row["hi"]
            )
            y_int = builder.fmul(builder.sitofp(q, vf), _splat(builder, row["scale"], vf))
            b_int = builder.block
        with floating:
            y_flt = builder.fadd(
                builder.fmul(builder.sitofp(exact, vf), _splat(builder, row["scale"], vf)),
                _splat(builder, row["bias"], vf),
            )
            b_flt = builder.block
    y = builder.phi(vf)
    y.add_incoming(y_int, b_int)
    y.add_incoming(y_flt, b_flt)
    return y


def _rshift_round(builder: ir.IRBuilder, y: ir.Value, sh: ir.Value) -> ir.Value:
    """:func:`prunekit.quant.rounding.rshift_round` on an i64 vector, with the same operations (an
    arithmetic shift is Python's ``>>``)."""
    one = ir.Constant(y.type, [1] * y.type.count)
    half = builder.sub(builder.shl(one, builder.sub(sh, one)), one)  # 2**(sh-1) - 1
    odd = builder.and_(builder.ashr(y, sh), one)  # the quotient's parity: the carry at a tie
    return builder.ashr(builder.add(builder.add(y, half), odd), sh)


def _clamp(builder: ir.IRBuilder, y: ir.Value, lo: ir.Value, hi: ir.Value) -> ir.Value:
    """``y`` (an integer vector of any width) clamped to the scalars ``[lo, hi]`` of its lane type."""
    lo_v, hi_v = _splat(builder, lo, y.type), _splat(builder, hi, y.type)
    y = builder.select(builder.icmp_signed("<", y, lo_v), lo_v, y)
    return builder.select(builder.icmp_signed(">", y, hi_v), hi_v, y)


def requantize_vector(builder: ir.IRBuilder, v32, bias_q, mult, shift, lo, hi) -> ir.Value:
    """:func:`prunekit.quant.rounding.requantize_value` on a vector of int32 ``v32`` (the same integers:
    ``v = v32 + bias_q`` in int64, ``clamp(rshift_round(v * mult, shift), lo, hi)``); i64 scalars in, int32
    lanes out."""
    n = v32.type.count
    v64 = ir.VectorType(_I64, n)
    v = builder.add(builder.sext(v32, v64), _splat(builder, bias_q, v64))
    y = _rshift_round(builder, builder.mul(v, _splat(builder, mult, v64)), _splat(builder, shift, v64))
    return builder.trunc(_clamp(builder, y, lo, hi), ir.VectorType(_I32, n))


def _roundeven_f64(builder: ir.IRBuilder, y: ir.Value) -> ir.Value:
    """``y`` (a float64 vector) rounded half to even."""
    vd = y.type
    return builder.call(_declare(builder, f"llvm.roundeven.v{vd.count}f64", vd, [vd]), [y])


def requantize_f64(builder: ir.IRBuilder, v: ir.Value, bound: ir.Value, factor: ir.Value, lo, hi) -> ir.Value:
    """:func:`requantize_vector` for the integer chain in float64, the same integers: ``v`` (int32 lanes,
    ``acc + comp + bias_q``) clamped to ``[-bound, bound]``, times ``factor = mult * 2**-shift``, rounded half
    to even, clamped to ``[lo, hi]`` (i32 scalars). Exact where ``conv.requant_f64`` allows it: ``|v| * mult
    < 2**53`` after the first clamp, so the product and its power-of-two scaling are exact and the rounding
    is ``rshift_round``'s; beyond ``bound`` the result saturates anyway. 7 vector operations against 11
    int64 ones (twice: 16 lanes are two registers of int64)."""
    n = v.type.count
    vd = ir.VectorType(ir.DoubleType(), n)
    v = _clamp(builder, v, builder.neg(bound), bound)
    y = _roundeven_f64(builder, builder.fmul(builder.sitofp(v, vd), _splat(builder, factor, vd)))
    return _clamp(builder, builder.fptosi(y, v.type), lo, hi)


def _near(builder: ir.IRBuilder, y: ir.Value, thr: ir.Value) -> tuple[ir.Value, ir.Value]:
    """``round_half_even(y)`` (float32 lanes) and, as an ``iN`` bit mask, the lanes whose ``y`` is less than
    ``thr`` (a vector) from it: the float32 exactness test of :func:`_rounded_or`."""
    vf = y.type
    n = vf.count
    near = builder.call(_declare(builder, f"llvm.roundeven.v{n}f32", vf, [vf]), [y])
    off = builder.call(_declare(builder, f"llvm.fabs.v{n}f32", vf, [vf]), [builder.fsub(y, near)])
    return near, builder.bitcast(builder.fcmp_ordered("<", off, thr), ir.IntType(n))


def _fclamp(builder: ir.IRBuilder, x: ir.Value, lo: ir.Value, hi: ir.Value) -> ir.Value:
    """``x`` (float32 lanes) clamped to the vectors ``[lo, hi]``."""
    vf = x.type
    fmax = _declare(builder, f"llvm.maxnum.v{vf.count}f32", vf, [vf, vf])
    fmin = _declare(builder, f"llvm.minnum.v{vf.count}f32", vf, [vf, vf])
    return builder.call(fmin, [builder.call(fmax, [x, lo]), hi])


def _rounded_or(builder: ir.IRBuilder, y: ir.Value, eps: ir.Value, lo, hi, exact: Callable) -> ir.Value:
    """``clamp(round_half_even(y), lo, hi)`` as int32 lanes, where ``y`` (float32 lanes) is within ``eps / 2``
    (a float32 scalar) of the exact value in every lane that does not saturate: when every lane's ``y`` is
    less than ``0.5 - eps`` from its nearest integer ``n``, the exact value rounds to ``n`` too (ties
    included: a tie is never that far from one), so ``n`` is returned; otherwise ``exact()`` (the float64
    spelling) runs for this vector. ``lo``, ``hi``: i32 scalars."""
    n = y.type.count
    vf, vi = y.type, ir.VectorType(_I32, n)
    near, safe = _near(builder, y, _splat(builder, builder.fsub(ir.Constant(_F32, 0.5), eps), vf))
    every = builder.icmp_unsigned("==", safe, ir.Constant(ir.IntType(n), (1 << n) - 1))
    with builder.if_else(every, likely=True) as (fast, slow):
        with fast:
            lo_f, hi_f = (_splat(builder, builder.sitofp(b, _F32), vf) for b in (lo, hi))
            q_fast = builder.fptosi(_fclamp(builder, near, lo_f, hi_f), vi)
            b_fast = builder.block
        with slow:
            q_slow = exact()
            b_slow = builder.block
    q = builder.phi(vi)
    q.add_incoming(q_fast, b_fast)
    q.add_incoming(q_slow, b_slow)
    return q


def requantize_chain(builder: ir.IRBuilder, v: ir.Value, bound: ir.Value, factor: ir.Value, lo, hi):
    """:func:`requantize_f64`'s integers at half its cost where float32 provably gives them
    (:func:`_rounded_or`): ``y = float32(v) * float32(factor)``.

    ``y`` carries three roundings of relative size ``2**-24`` (``v``, ``factor``, the product), so ``|y - v
    * factor| < |y| * 2**-22``; a lane with ``|v| <= bound`` has ``|y| <= bound * factor``, hence ``eps =
    bound * factor * 2**-21``. A lane past ``bound`` saturates either way: ``bound * factor >= 128``, so
    ``|y| > 127.5`` too. The float64 fallback runs for about one vector in 400 (``2 * eps`` per lane, with
    ``bound * factor`` near 128): 16 lanes of float32 (10 operations) against two registers of float64
    (about 16 each)."""
    vf = ir.VectorType(_F32, v.type.count)
    f32 = builder.fptrunc(factor, _F32)
    eps = builder.fmul(builder.fmul(builder.sitofp(bound, _F32), f32), ir.Constant(_F32, 2.0**-21))
    y = builder.fmul(builder.sitofp(v, vf), _splat(builder, f32, vf))
    return _rounded_or(builder, y, eps, lo, hi, lambda: requantize_f64(builder, v, bound, factor, lo, hi))


def int8_add(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, add: dict) -> ir.Value:
    """``prunekit.quant.glue.QuantizedAdd`` on float32 vectors ``a`` (this convolution's output) and ``b``
    (the residual): each operand's integers recovered (``round_half_even(x / s)``, a float32 division, as
    :func:`prunekit.quant.rounding.recover`), ``clamp(rshift_round(qa * Ma + qb * Mb, sh), -127, 127)``,
    returned as ``float32(q) * s_out``. ``add``: ``s_a``, ``s_b``, ``s_out`` (f32), ``ma``, ``mb``, ``sh``
    (i64) scalars."""
    vf = a.type
    n = vf.count
    v64 = ir.VectorType(_I64, n)
    rint = _declare(builder, f"llvm.roundeven.v{n}f32", vf, [vf])

    def recover(x, scale):
        return builder.fptosi(builder.call(rint, [builder.fdiv(x, _splat(builder, scale, vf))]), v64)

    qa, qb = recover(a, add["s_a"]), recover(b, add["s_b"])
    t = builder.add(
        builder.mul(qa, _splat(builder, add["ma"], v64)), builder.mul(qb, _splat(builder, add["mb"], v64))
    )
    q = _rshift_round(builder, t, _splat(builder, add["sh"], v64))
    q = _clamp(builder, q, ir.Constant(_I64, -127), ir.Constant(_I64, 127))
    return builder.fmul(builder.sitofp(q, vf), _splat(builder, add["s_out"], vf))


def residual_byte(builder: ir.IRBuilder, units: ir.Value, shift: ir.Value, key: ir.Value) -> ir.Value:
    """One channel's int8 value from 32-bit lanes of 4 activation bytes (``shift``: 8 times the channel's
    place, in every lane): ``(((u >> shift) & 255) ^ key) - 128`` (``key`` 128 for plain signed bytes, which
    sign-extends them; 0 for +128-encoded bytes)."""
    vi = units.type
    n = vi.count
    x = builder.and_(builder.lshr(units, shift), ir.Constant(vi, [255] * n))
    return builder.sub(builder.xor(x, key), ir.Constant(vi, [128] * n))


def int8_add_integers(builder: ir.IRBuilder, qa: ir.Value, qb: ir.Value, add: dict) -> ir.Value:
    """:func:`int8_add` on the operands' integers themselves (int32 lanes in, int32 lanes out):
    ``clamp(rshift_round(qa * Ma + qb * Mb, sh), -127, 127)``, computed in float64 where it is exact: the
    operands are int8 and ``Ma, Mb < 2**31`` (``prunekit.quant.rounding.add_multipliers``), so the products
    and their sum stay below 2**40, the scaling by ``2**-sh`` is exact and rounding half to even is
    ``rshift_round``. Equal to :func:`int8_add` when each operand is ``float32(q) * s`` at the add's own
    scale (recovering q from it is exact), which is what the integer chain (``FLAG_CHAIN``) is checked for.

    First in float32 (:func:`_rounded_or`): ``y = qa * A + qb * B`` with ``A = float32(Ma * 2**-sh)``
    (likewise ``B``); the operands are exact (``qb``, a residual byte, may be -128), each product carries
    two roundings and the sum one, so ``|y - exact| < 128 * (A + B) * 2**-22`` and ``eps = 128 * (A + B) *
    2**-21``."""
    vf = ir.VectorType(_F32, qa.type.count)
    a32, b32, eps = _add_constants(builder, add)
    y = builder.fadd(
        builder.fmul(builder.sitofp(qa, vf), _splat(builder, a32, vf)),
        builder.fmul(builder.sitofp(qb, vf), _splat(builder, b32, vf)),
    )

    return _rounded_or(builder, y, eps, _I32(-127), _I32(127), lambda: int8_add_exact(builder, qa, qb, add))


def _pow2_neg(builder: ir.IRBuilder, sh: ir.Value) -> ir.Value:
    """``2**-sh`` as a float64 (its bits built directly: ``sh`` is an i64 below 1023)."""
    return builder.bitcast(builder.shl(builder.sub(_c64(1023), sh), _c64(52)), ir.DoubleType())


def _add_constants(builder: ir.IRBuilder, add: dict) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The fused add's float32 scalars (:func:`int8_add_integers`): ``A = float32(Ma * 2**-sh)``, ``B``
    likewise, and its ``eps = 128 * (A + B) * 2**-21``."""
    f64, unit = ir.DoubleType(), _pow2_neg(builder, add["sh"])
    a32, b32 = (builder.fptrunc(builder.fmul(builder.sitofp(add[k], f64), unit), _F32) for k in ("ma", "mb"))
    return a32, b32, builder.fmul(builder.fadd(a32, b32), ir.Constant(_F32, 2.0**-14))  # 128 * 2**-21


def int8_add_exact(builder: ir.IRBuilder, qa: ir.Value, qb: ir.Value, add: dict) -> ir.Value:
    """:func:`int8_add_integers` in float64 alone (exact: products and sum below 2**40, scaled by a power
    of two), clamped to [-127, 127]."""
    vd = ir.VectorType(ir.DoubleType(), qa.type.count)
    f64 = ir.DoubleType()
    unit = _pow2_neg(builder, add["sh"])
    ma, mb = (_splat(builder, builder.sitofp(add[k], f64), vd) for k in ("ma", "mb"))
    t = builder.fadd(builder.fmul(builder.sitofp(qa, vd), ma), builder.fmul(builder.sitofp(qb, vd), mb))
    y = _roundeven_f64(builder, builder.fmul(t, _splat(builder, unit, vd)))
    return _clamp(builder, builder.fptosi(y, qa.type), _I32(-127), _I32(127))


def int8_quantize(builder: ir.IRBuilder, vf: ir.VectorType, y: ir.Value, s_next: ir.Value, qlo: ir.Value):
    """The next layer's activation: ``clamp(round_half_even(y / s_next), qlo, 127)`` as int32 lanes
    (``prunekit.quant.rounding.quantize_activation``: a float32 division, not a product by the inverse)."""
    n = vf.count
    rint = _declare(builder, f"llvm.roundeven.v{n}f32", vf, [vf])
    q = builder.call(rint, [builder.fdiv(y, _splat(builder, s_next, vf))])
    q = _fclamp(builder, q, _splat(builder, qlo, vf), ir.Constant(vf, [127.0] * n))
    return builder.fptosi(q, ir.VectorType(_I32, n))


def _dot4(builder: ir.IRBuilder, isa: str, vi: ir.VectorType) -> Callable:
    """``acc + sum of 4 u8 x s8 products per 32-bit lane``: vpdpbusd (VNNI), else vpmaddubsw + vpmaddwd."""
    if isa == "vnni512":
        vpdp = _declare(builder, "llvm.x86.avx512.vpdpbusd.512", vi, [vi, vi, vi])
        return lambda acc, x, w: builder.call(vpdp, [acc, x, w])
    v32b, v16w = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16)
    mubs = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", v16w, [v32b, v32b])
    mwd = _declare(builder, "llvm.x86.avx2.pmadd.wd", vi, [v16w, v16w])
    ones = ir.Constant(v16w, [1] * 16)

    def dot(acc, x, w):
        pairs = builder.call(mubs, [builder.bitcast(x, v32b), builder.bitcast(w, v32b)])
        return builder.add(acc, builder.call(mwd, [pairs, ones]))

    return dot


@cache
def _i8_tile(nv: int, isa: str):
    """Intrinsic ``(arrays, ints)`` for one group of 4 output channels ``co0..co0+3`` and one tile of ``nv``
    vectors; ``arrays = (offs, wv, ptr, X, S, Y, yoffs, M, comp, scale, bias, clamp, R, q, F, rq)``, ``ints =
    (co0, xb, sb, sstride, flags, yb, ns, mb, ml, rb, rstride, fb, fstride, pb)``.

    acc (int32) = (S[sb + r*sstride:] if INIT) + sum over the row's blocks of dot4(X[xb + offs[k]:], wv[k]);
    not FINAL: S[...] = acc. FINAL: ``y = int8_epilogue(acc)`` (+ R[rb + r*rstride:] if RESID), clamped to
    ``clamp[0..1]``; FLOAT_OUT: ``F[fb + r*fstride:] = y``; BYTES_OUT: the byte of channel ``co0 + r`` in
    each 32-bit lane is ``(int8_quantize(y) + offset) & 255`` (``q``: s_next, lowest level, then as int32:
    offset, zero pattern), stored to every output plane with padding lanes set to the zero pattern.
    Each row's epilogue runs right after its sums, so only ``nv`` accumulators (and the ``nv`` packed
    outputs) are live at a time: keeping all four rows' accumulators spilled registers inside the loops.
    """
    vw = 16 if isa == "vnni512" else 8
    vi, vf = ir.VectorType(_I32, vw), ir.VectorType(_F32, vw)

    @intrinsic
    def tile(typingctx, arrays, ints):
        def codegen(context, builder, signature, args):
            unpacked = _unpack(context, builder, signature.args[0], args[0])
            op, wp, pp, xp, sp, yp, yop, mp, cp, scp, bp, clp, rp, qp, fp, rqp = unpacked
            co0, xb, sb, sstride, flags, yb, ns, mb, ml, rb, rstride, fb, fstride, pb = _ints(
                builder, args[1], 14
            )
            pp = builder.gep(pp, [pb])  # this channel block's row pointers
            dot = _dot4(builder, isa, vi)
            zero_i = ir.Constant(vi, [0] * vw)
            init = _flag(builder, flags, FLAG_INIT)
            xbase = builder.gep(xp, [xb])

            def sums(r: ir.Value) -> tuple:
                co = builder.add(co0, r)
                lo = builder.load(builder.gep(pp, [co]))
                hi = builder.load(builder.gep(pp, [builder.add(co, _c64(1))]))
                srow = builder.add(sb, builder.mul(sstride, r))
                accs = [
                    builder.select(init, _vload(builder, sp, builder.add(srow, _c64(vw * i)), vi), zero_i)
                    for i in range(nv)
                ]

                def body(k, accs):
                    row = builder.gep(xbase, [builder.sext(builder.load(builder.gep(op, [k])), _I64)])
                    w = _splat(builder, builder.load(builder.gep(wp, [k])), vi)
                    return [dot(a, _vload(builder, row, _c64(vw * i), vi), w) for i, a in enumerate(accs)]

                return co, srow, emit_loop(builder, lo, hi, accs, body, "conv")

            with builder.if_else(_flag(builder, flags, FLAG_FINAL)) as (do_final, do_partial):
                with do_partial:

                    def partial(r, _):
                        _, srow, accs = sums(r)
                        for i in range(nv):
                            _vstore(builder, accs[i], sp, builder.add(srow, _c64(vw * i)))
                        return []

                    emit_loop(builder, _c64(0), _c64(4), [], partial, "rows")
                with do_final:
                    fmax = _declare(builder, f"llvm.maxnum.v{vw}f32", vf, [vf, vf])
                    fmin = _declare(builder, f"llvm.minnum.v{vw}f32", vf, [vf, vf])
                    lo_v = _splat(builder, builder.load(clp), vf)
                    hi_v = _splat(builder, builder.load(builder.gep(clp, [_c64(1)])), vf)
                    s_next, qlo = builder.load(qp), builder.load(builder.gep(qp, [_c64(1)]))
                    qint = builder.bitcast(builder.gep(qp, [_c64(2)]), _I32.as_pointer())
                    offset = _splat(builder, builder.load(qint), vi)
                    zpat = _splat(builder, builder.load(builder.gep(qint, [_c64(1)])), vi)
                    ones = ir.Constant(vi, [-1] * vw)
                    integer = _flag(builder, flags, FLAG_INTEGER)
                    qadd = _flag(builder, flags, FLAG_QADD)
                    add = {
                        k: builder.load(builder.gep(qp, [_c64(4 + j)]))
                        for j, k in enumerate(("s_a", "s_b", "s_out"))
                    }
                    for j, k in enumerate(("ma", "mb", "sh")):
                        add[k] = builder.load(builder.gep(rqp, [_c64(2 + j)]))

                    def keep(v, m):  # the value where the mask is set, the zero pattern elsewhere
                        return builder.or_(builder.and_(v, m), builder.and_(zpat, builder.xor(m, ones)))

                    def store_bytes(packed: list) -> None:
                        with builder.if_then(_flag(builder, flags, FLAG_BYTES_OUT)):
                            zero_pad = builder.icmp_signed(
                                "==", builder.extract_element(zpat, _c64(0)), _I32(0)
                            )
                            with builder.if_else(zero_pad) as (plain, encoded):
                                with plain:  # padding is 0: the mask alone
                                    _store_all(builder, vi, packed, yp, yb, yop, ns, mp, mb, ml, builder.and_)
                                with encoded:
                                    _store_all(builder, vi, packed, yp, yb, yop, ns, mp, mb, ml, keep)

                    def rows(body) -> None:
                        """The group's 4 output channels as a loop, not unrolled (unrolled, the 8 epilogue
                        variants made the kernels' first compilation 3.4x slower): ``body(r, packed) ->
                        packed``, each row adding its byte to the ``nv`` packed output vectors; then the
                        stores."""
                        store_bytes(emit_loop(builder, _c64(0), _c64(4), [zero_i] * nv, body, "rows"))

                    def byte_shift(r: ir.Value) -> ir.Value:  # 8 * r in every lane
                        return _splat(builder, builder.trunc(builder.mul(r, _c64(8)), _I32), vi)

                    float_out = _flag(builder, flags, FLAG_FLOAT_OUT)  # a branch per vector: predictable

                    def final(resid: bool) -> None:
                        """Sums and epilogue with the residual fixed at compile time (one copy each: no
                        per-vector select between the two arithmetics)."""

                        def row_body(r, packed):
                            packed = list(packed)
                            co, _, accs = sums(r)
                            at = builder.add(_c64(RQ_HEAD), builder.mul(co, _c64(RQ_STRIDE)))
                            row = {
                                "comp": builder.load(builder.gep(cp, [co])),
                                "scale": builder.load(builder.gep(scp, [co])),
                                "bias": builder.load(builder.gep(bp, [co])),
                                "lo": builder.load(rqp),
                                "hi": builder.load(builder.gep(rqp, [_c64(1)])),
                            }
                            for k, key in enumerate(("bias_q", "mult", "shift")):
                                row[key] = builder.load(builder.gep(rqp, [builder.add(at, _c64(k))]))
                            for i in range(nv):
                                y = int8_epilogue(builder, vf, accs[i], row, integer)
                                if resid:
                                    off = builder.add(builder.add(rb, builder.mul(rstride, r)), _c64(vw * i))
                                    res = _vload(builder, rp, off, vf)
                                    y = builder.select(  # a fused integer add, or a float32 one
                                        qadd, int8_add(builder, y, res, add), builder.fadd(y, res)
                                    )
                                y = builder.call(fmin, [builder.call(fmax, [y, lo_v]), hi_v])
                                with builder.if_then(float_out):
                                    off = builder.add(builder.add(fb, builder.mul(fstride, r)), _c64(vw * i))
                                    _vstore(builder, y, fp, off)
                                q = builder.add(int8_quantize(builder, vf, y, s_next, qlo), offset)
                                q = builder.and_(q, ir.Constant(vi, [255] * vw))
                                packed[i] = builder.or_(packed[i], builder.shl(q, byte_shift(r)))
                            return packed

                        rows(row_body)

                    def final_chain(resid: bool) -> None:
                        """FLAG_CHAIN: the integer output form kept in integers (module docstring): the
                        requantized q, the fused add on the residual's bytes, the ReLU as ``max(q, clo)``;
                        float32 ``q * s_out`` only where FLOAT_OUT asks for it."""
                        clo = _splat(builder, builder.load(builder.gep(qint, [_c64(5)])), vi)
                        rkey = _splat(builder, builder.load(builder.gep(qint, [_c64(6)])), vi)
                        rint_p = builder.bitcast(rp, _I32.as_pointer())
                        qlo_i, qhi_i = (
                            builder.trunc(builder.load(builder.gep(rqp, [_c64(k)])), _I32) for k in (0, 1)
                        )

                        def row_body(r, packed):
                            packed = list(packed)
                            co, _, accs = sums(r)
                            at = builder.add(_c64(RQ_HEAD), builder.mul(co, _c64(RQ_STRIDE)))
                            bias_q, _, _, bound, factor = (
                                builder.load(builder.gep(rqp, [builder.add(at, _c64(k))])) for k in range(5)
                            )
                            base = builder.add(
                                builder.load(builder.gep(cp, [co])), builder.trunc(bias_q, _I32)
                            )
                            base = _splat(builder, base, vi)
                            bound = builder.trunc(bound, _I32)
                            factor = builder.bitcast(factor, ir.DoubleType())
                            s_fin = add["s_out"] if resid else builder.load(builder.gep(scp, [co]))
                            for i in range(nv):
                                q = requantize_chain(
                                    builder, builder.add(accs[i], base), bound, factor, qlo_i, qhi_i
                                )
                                if resid:
                                    units = _vload(builder, rint_p, builder.add(rb, _c64(vw * i)), vi)
                                    qb = residual_byte(builder, units, byte_shift(r), rkey)
                                    q = int8_add_integers(builder, q, qb, add)
                                q = builder.select(builder.icmp_signed(">", q, clo), q, clo)
                                with builder.if_then(float_out):
                                    off = builder.add(builder.add(fb, builder.mul(fstride, r)), _c64(vw * i))
                                    y = builder.fmul(builder.sitofp(q, vf), _splat(builder, s_fin, vf))
                                    _vstore(builder, y, fp, off)
                                b = builder.and_(builder.add(q, offset), ir.Constant(vi, [255] * vw))
                                packed[i] = builder.or_(packed[i], builder.shl(b, byte_shift(r)))
                            return packed

                        rows(row_body)

                    def variants(body) -> None:
                        """``body(resid)`` with and without a residual."""
                        with builder.if_else(_flag(builder, flags, FLAG_RESID)) as (with_r, without_r):
                            with with_r:
                                body(True)
                            with without_r:
                                body(False)

                    with builder.if_else(_flag(builder, flags, FLAG_CHAIN)) as (chained, general):
                        with chained:
                            variants(final_chain)
                        with general:
                            variants(final)
            return context.get_dummy_value()

        return types.void(arrays, ints), codegen

    return tile


CHAIN_CONSTS = 4  # per channel: acc + comp + bias_q offset (i32), factor, 0.5 - eps, s_fin (f32 bits)


def chain_constants(comp, bias_q, bound, factor_bits, s_fin) -> np.ndarray:
    """Per channel the constants of :func:`_chain_epilogue`, as :func:`requantize_chain` computes them in
    float32 (the same operations, so the same values): ``comp + bias_q`` (int32, wrapping as the kernel's
    int32 sum does), ``float32(factor)``, ``0.5 - bound * factor * 2**-21`` and the output scale ``s_fin``."""
    out = np.zeros((comp.size, CHAIN_CONSTS), np.int32)
    out[:, 0] = (comp.astype(np.int64) + bias_q.astype(np.int64)).astype(np.int32)
    f32 = factor_bits.view(np.float64).astype(np.float32)
    eps = bound.astype(np.int32).astype(np.float32) * f32 * np.float32(2.0**-21)
    as_f = out.view(np.float32)
    as_f[:, 1], as_f[:, 2], as_f[:, 3] = f32, np.float32(0.5) - eps, s_fin
    return out.reshape(-1)


class _ChainRows:
    """IR for :func:`_chain_epilogue`: the 4 x ``nv`` outputs of a group of 4 channels from the sums in
    ``S``, in float32 with a record of the lanes not provably exact (``fast``), or in float64 (``exact``)."""

    def __init__(self, builder: ir.IRBuilder, nv: int, resid: bool, p: dict, i: dict) -> None:
        self.b, self.nv, self.resid, self.p, self.i = builder, nv, resid, p, i
        vw = 16
        self.vi, self.vf, self.mask_t = ir.VectorType(_I32, vw), ir.VectorType(_F32, vw), ir.IntType(vw)
        b, vf = builder, self.vf
        qint = b.bitcast(b.gep(p["q"], [_c64(2)]), _I32.as_pointer())
        self.offset = _splat(b, b.load(qint), self.vi)
        self.zpat = _splat(b, b.load(b.gep(qint, [_c64(1)])), self.vi)
        self.rkey = _splat(b, b.load(b.gep(qint, [_c64(6)])), self.vi)
        clo = b.load(b.gep(qint, [_c64(5)]))
        self.lo, self.hi = (b.trunc(b.load(b.gep(p["rq"], [_c64(k)])), _I32) for k in (0, 1))
        self.add = {k: b.load(b.gep(p["rq"], [_c64(2 + j)])) for j, k in enumerate(("ma", "mb", "sh"))}

        def imax(x, y):
            return b.select(b.icmp_signed(">", x, y), x, y)

        # the ReLU (clo 0, else INT_MIN) folded into the last clamp: max(clamp(x, l, h), clo) equals
        # clamp(x, max(l, clo), max(h, clo)) for any l <= h
        last = (_I32(-127), _I32(127)) if resid else (self.lo, self.hi)
        self.last_lo, self.last_hi = (imax(v, clo) for v in last)
        fs = [_splat(b, b.sitofp(v, _F32), vf) for v in (self.lo, self.hi, self.last_lo, self.last_hi)]
        self.first_f = (fs[0], fs[1]) if resid else (fs[2], fs[3])
        self.last_f = (fs[2], fs[3])
        if resid:  # the fused add's float32 constants, as int8_add_integers computes them
            a32, b32, eps = _add_constants(b, self.add)
            self.thr_add = _splat(b, b.fsub(ir.Constant(_F32, 0.5), eps), vf)
            self.a32, self.b32 = _splat(b, a32, vf), _splat(b, b32, vf)

    def _rounded(self, y, thr, bounds, unsafe):
        """``clamp(round_half_even(y))`` as an integer-valued float vector; ``unsafe`` gains the lanes
        farther than ``thr`` from their nearest integer (:func:`_rounded_or`'s test)."""
        near, ok = _near(self.b, y, thr)
        unsafe = self.b.or_(unsafe, self.b.xor(ok, ir.Constant(self.mask_t, -1)))
        return _fclamp(self.b, near, *bounds), unsafe

    def group(self, exact: bool) -> tuple[list, ir.Value]:
        """The packed output vectors (4 channels' bytes per lane) and the unsafe lanes; float32 stores
        where FLOAT_OUT."""
        b, p, i, vi, vf, nv = self.b, self.p, self.i, self.vi, self.vf, self.nv
        packed, unsafe = [ir.Constant(vi, [0] * 16)] * nv, ir.Constant(self.mask_t, 0)
        rint = b.bitcast(p["R"], _I32.as_pointer())
        units = [_vload(b, rint, b.add(i["rb"], _c64(16 * k)), vi) for k in range(nv)] if self.resid else []
        cpf = b.bitcast(p["cst"], _F32.as_pointer())
        for r in range(4):
            co = b.add(i["co0"], _c64(r))
            at = b.mul(co, _c64(CHAIN_CONSTS))
            base = _splat(b, b.load(b.gep(p["cst"], [at])), vi)
            fac, thr, s_fin = (_splat(b, b.load(b.gep(cpf, [b.add(at, _c64(k))])), vf) for k in (1, 2, 3))
            if exact:  # the float64 constants of requantize_f64
                rq_at = b.add(_c64(RQ_HEAD), b.mul(co, _c64(RQ_STRIDE)))
                bound = b.trunc(b.load(b.gep(p["rq"], [b.add(rq_at, _c64(3))])), _I32)
                factor = b.bitcast(b.load(b.gep(p["rq"], [b.add(rq_at, _c64(4))])), ir.DoubleType())
            shift = _splat(b, _I32(8 * r), vi)
            row = b.add(i["sb"], b.mul(i["ss"], _c64(r)))
            for k in range(nv):
                v = b.add(_vload(b, p["S"], b.add(row, _c64(16 * k)), vi), base)
                if exact:
                    first = (self.lo, self.hi) if self.resid else (self.last_lo, self.last_hi)
                    q = requantize_f64(b, v, bound, factor, *first)
                    if self.resid:
                        qb = residual_byte(b, units[k], shift, self.rkey)
                        q = _clamp(b, int8_add_exact(b, q, qb, self.add), self.last_lo, self.last_hi)
                else:
                    qf, unsafe = self._rounded(b.fmul(b.sitofp(v, vf), fac), thr, self.first_f, unsafe)
                    if self.resid:  # qf is float(q) (or -0.0 for 0): the add reads it without a conversion
                        qb = b.sitofp(residual_byte(b, units[k], shift, self.rkey), vf)
                        y = b.fadd(b.fmul(qf, self.a32), b.fmul(qb, self.b32))
                        qf, unsafe = self._rounded(y, self.thr_add, self.last_f, unsafe)
                    q = b.fptosi(qf, vi)
                with b.if_then(_flag(b, i["flags"], FLAG_FLOAT_OUT)):  # float32(q) * s: never -0.0
                    off = b.add(b.add(i["fb"], b.mul(i["fstride"], _c64(r))), _c64(16 * k))
                    _vstore(b, b.fmul(b.sitofp(q, vf), s_fin), p["F"], off)
                byte = b.and_(b.shl(b.add(q, self.offset), shift), ir.Constant(vi, [255 << (8 * r)] * 16))
                packed[k] = b.or_(packed[k], byte)
        return packed, unsafe

    def store(self, packed: list) -> None:
        """The packed vectors into every output plane (padding lanes: 0, or the +128 zero pattern)."""
        b, p, i, vi = self.b, self.p, self.i, self.vi
        ones = ir.Constant(vi, [-1] * 16)

        def keep(v, m):  # the value where the mask is set, the zero pattern elsewhere
            return b.or_(b.and_(v, m), b.and_(self.zpat, b.xor(m, ones)))

        args = (p["Y"], i["yb"], p["yoffs"], i["ns"], p["M"], i["mb"], i["ml"])
        with b.if_then(_flag(b, i["flags"], FLAG_BYTES_OUT)):
            zero_pad = b.icmp_signed("==", b.extract_element(self.zpat, _c64(0)), _I32(0))
            with b.if_else(zero_pad) as (plain, encoded):
                with plain:
                    _store_all(b, vi, packed, *args, b.and_)
                with encoded:
                    _store_all(b, vi, packed, *args, keep)


@cache
def _chain_epilogue(nv: int, resid: bool):
    """Intrinsic ``(arrays, ints)``: the integer chain's epilogue (``final_chain`` of :func:`_i8_tile`, the
    same integers) for one group of 4 output channels and a tile of ``nv`` vectors of 16 whose exact sums
    are in ``S``, the 4 rows unrolled, with per-channel constants precomputed (:func:`chain_constants`),
    the ReLU folded into the last clamp, the fused add reading the requantized value as a float, and one
    branch for the group: every lane's float32 rounding is tested as in :func:`_rounded_or`, and if any
    lane of the group is not provably exact the group is computed again in float64
    (:func:`requantize_f64`, :func:`int8_add_exact`). ``arrays = (S, Y, yoffs, M, cst, R, q, F, rq)``,
    ``ints = (co0, sb, ss, yb, ns, mb, ml, rb, fb, fstride, flags)``. Isolated, on a layer of the
    50%-channel ResNet-18 (no residual): 5.8 -> 3.3 ns per vector."""
    names = ("S", "Y", "yoffs", "M", "cst", "R", "q", "F", "rq")
    int_names = ("co0", "sb", "ss", "yb", "ns", "mb", "ml", "rb", "fb", "fstride", "flags")

    @intrinsic
    def epilogue(typingctx, arrays, ints):
        def codegen(context, builder, signature, args):
            p = dict(zip(names, _unpack(context, builder, signature.args[0], args[0]), strict=True))
            i = dict(zip(int_names, _ints(builder, args[1], len(int_names)), strict=True))
            rows = _ChainRows(builder, nv, resid, p, i)
            fast, unsafe = rows.group(exact=False)
            b_fast = builder.block
            with builder.if_then(
                builder.icmp_unsigned("!=", unsafe, ir.Constant(rows.mask_t, 0)), likely=False
            ):
                slow, _ = rows.group(exact=True)
                b_slow = builder.block
            packed = []
            for f, sl in zip(fast, slow, strict=True):
                phi = builder.phi(rows.vi)
                phi.add_incoming(f, b_fast)
                phi.add_incoming(sl, b_slow)
                packed.append(phi)
            rows.store(packed)
            return context.get_dummy_value()

        return types.void(arrays, ints), codegen

    return epilogue


SHARED_NV = (2, 4)  # the shared-load tile's vectors (4 x nv accumulators must stay in registers)
_E2, _E2R, _E4, _E4R = (_chain_epilogue(n, r) for n in SHARED_NV for r in (False, True))


@cache
def _i8_group_tile(nv: int):
    """Intrinsic ``(arrays, ints)``: the sums of one group of 4 output channels whose blocks were packed
    together (``conv.pack_group_blocks``: one input offset and 4 weights per block), AVX-512 VNNI.
    ``arrays = (offs, wv, ptr, X, S)``, ``ints = (g, xb, sb, sstride, init, pb)``::

        S[sb + r*sstride + :] = (S[...] if init) + sum over the group's blocks k of
                                dot4(X[xb + offs[k]:], wv[4k + r])

    Each activation vector is loaded once for the 4 channels (the per-channel tile loads it once per
    channel and block): ``4 * nv`` accumulators, then the ordinary tile's epilogue reads them from ``S``."""
    vw = 16
    vi = ir.VectorType(_I32, vw)

    @intrinsic
    def tile(typingctx, arrays, ints):
        def codegen(context, builder, signature, args):
            op, wp, pp, xp, sp = _unpack(context, builder, signature.args[0], args[0])
            g, xb, sb, sstride, init, pb = _ints(builder, args[1], 6)
            pp = builder.gep(pp, [pb])
            dot = _dot4(builder, "vnni512", vi)
            zero = ir.Constant(vi, [0] * vw)
            first = builder.icmp_unsigned("!=", init, _c64(0))
            xbase = builder.gep(xp, [xb])
            rows = [builder.add(sb, builder.mul(sstride, _c64(r))) for r in range(4)]
            at = [[builder.add(rows[r], _c64(vw * i)) for i in range(nv)] for r in range(4)]
            accs = [
                builder.select(first, _vload(builder, sp, at[r][i], vi), zero)
                for r in range(4)
                for i in range(nv)
            ]
            lo = builder.load(builder.gep(pp, [g]))
            hi = builder.load(builder.gep(pp, [builder.add(g, _c64(1))]))

            def body(k, accs):
                row = builder.gep(xbase, [builder.sext(builder.load(builder.gep(op, [k])), _I64)])
                w4 = builder.mul(k, _c64(4))
                ws = [
                    _splat(builder, builder.load(builder.gep(wp, [builder.add(w4, _c64(r))])), vi)
                    for r in range(4)
                ]
                xs = [_vload(builder, row, _c64(vw * i), vi) for i in range(nv)]
                return [dot(accs[r * nv + i], xs[i], ws[r]) for r in range(4) for i in range(nv)]

            accs = emit_loop(builder, lo, hi, accs, body, "group")
            for r in range(4):
                for i in range(nv):
                    _vstore(builder, accs[r * nv + i], sp, at[r][i])
            return context.get_dummy_value()

        return types.void(arrays, ints), codegen

    return tile


_G16_2, _G16_4 = (_i8_group_tile(n) for n in SHARED_NV)
_Q16_2, _Q16_4, _Q16_7, _Q16_8 = (_i8_tile(n, "vnni512") for n in NV16)
_Q8_4, _Q8_7, _Q8_8, _Q8_14 = (_i8_tile(n, "avx2") for n in NV8)


@_jit(fastmath=False)
def conv_i8(vw, nv, ptr, offs, wv, X, Y, yoffs, M, comp, scale, bias, clamp, R, qp, F, rq, S, P0, cst, geo):
    """One int8 sparse conv layer (4x1 input-channel blocks), output groups of 4 channels
    ``[geo[7], geo[8])``. ``geo`` (int64): tiles, ybase, ystride (per output group), planes ``ns``, mask
    length ``ml``, rbase, rstride (per channel), g0, g1, flags (RESID / FLOAT_OUT / BYTES_OUT / INTEGER bits;
    INTEGER: ``rq`` = [lo, hi, Ma, Mb, sh, then bias_q, mult, shift per channel], the requantization's
    constants; QADD: the residual joins through :func:`int8_add`, ``qp[4:7]`` its scales), fbase,
    fstride (per channel), whole (0: ``S`` is a per-tile scratch of ``cout * T``; else ``S`` holds whole
    accumulators, ``whole`` per channel, that the weights add to: the dense path's epilogue), shared (1:
    the blocks were packed per group of 4 channels, ``conv.pack_group_blocks``: :func:`_i8_group_tile` sums
    into ``S``, then the ordinary tile runs the epilogue from ``S`` with the empty row pointers ``P0``).
    With ``FLAG_UNROLLED`` (the integer chain, 16 lanes, ``nv`` in ``SHARED_NV``), where the finished sums
    are in ``S`` (shared loads, whole accumulators), :func:`_chain_epilogue` runs the epilogue (``cst``:
    its :func:`chain_constants`); the per-channel tiles keep theirs, right after each row's sums (moving
    those sums through ``S`` measured slower: the 90% 4x1 ResNet-18, 4.07 -> 4.12 ms). No fastmath: the
    epilogue must round exactly like the reference."""
    ntiles, ybase, ystride, ns, ml, rbase, rstride = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    g0, g1, out_flags, fbase, fstride, whole = geo[7], geo[8], geo[9], geo[10], geo[11], geo[12]
    shared = geo[13]
    T = np.int64(nv * vw)
    chained = (out_flags >> FLAG_CHAIN) & 1
    ncb, stride_b = ptr.shape[0], np.int64(ptr.shape[1])
    arrays = (
        offs,
        wv,
        ptr,
        X,
        S,
        Y,
        yoffs,
        M,
        comp,
        scale,
        bias,
        clamp,
        R,
        qp,
        F,
        rq,
    )  # once: no refcounts in the loop
    sums_only = (offs, wv, ptr, X, S)
    epilogue_only = (offs, wv, P0, X, S, Y, yoffs, M, comp, scale, bias, clamp, R, qp, F, rq)
    chain_only = (S, Y, yoffs, M, cst, R, qp, F, rq)
    # the finished sums are in S (shared loads, whole accumulators): the unrolled epilogue where flagged
    unrolled = (out_flags >> FLAG_UNROLLED) & 1 != 0 and (shared != 0 or whole != 0)
    resid = (out_flags >> FLAG_RESID) & 1
    for t in range(ntiles):
        p0 = np.int64(t * T)
        for b in range(ncb):
            flags = np.int64(0)
            if b > 0 or whole != 0:
                flags |= 1 << FLAG_INIT
            if b == ncb - 1:
                flags |= (1 << FLAG_FINAL) | out_flags
            for g in range(g0, g1):
                co0 = np.int64(4 * g)
                sb, ss = (
                    (np.int64(co0 * whole + p0), np.int64(whole)) if whole != 0 else (np.int64(co0 * T), T)
                )
                yb = np.int64(ybase + g * ystride + p0)
                # the integer chain reads the residual's bytes (a unit per group), else floats per channel
                rb = np.int64(rbase + (g if chained else co0) * rstride + p0)
                fb = np.int64(fbase + co0 * fstride + p0)
                ints = (co0, p0, sb, ss, flags, yb, ns, p0, ml, rb, rstride, fb, fstride, b * stride_b)
                if shared != 0:  # the group's sums with shared loads
                    gints = (np.int64(g), p0, sb, ss, flags & (1 << FLAG_INIT), b * stride_b)
                    if nv == 4:
                        _G16_4(sums_only, gints)
                    else:
                        _G16_2(sums_only, gints)
                if unrolled:  # the integer chain's epilogue on the finished sums in S
                    if b == ncb - 1:
                        cints = (co0, sb, ss, yb, ns, p0, ml, rb, fb, fstride, out_flags)
                        if nv == 4:
                            if resid:
                                _E4R(chain_only, cints)
                            else:
                                _E4(chain_only, cints)
                        elif resid:
                            _E2R(chain_only, cints)
                        else:
                            _E2(chain_only, cints)
                    continue
                if shared != 0:  # the ordinary tile's epilogue on the sums in S
                    if b == ncb - 1:
                        fints = (co0, p0, sb, ss, flags | (1 << FLAG_INIT), yb, ns, p0, ml, rb, rstride, fb,
                                 fstride, np.int64(0))  # fmt: skip
                        if nv == 4:
                            _Q16_4(epilogue_only, fints)
                        else:
                            _Q16_2(epilogue_only, fints)
                    continue
                if vw == 16:
                    if nv == 8:
                        _Q16_8(arrays, ints)
                    elif nv == 7:
                        _Q16_7(arrays, ints)
                    elif nv == 4:
                        _Q16_4(arrays, ints)
                    else:
                        _Q16_2(arrays, ints)
                elif nv == 14:
                    _Q8_14(arrays, ints)
                elif nv == 8:
                    _Q8_8(arrays, ints)
                elif nv == 7:
                    _Q8_7(arrays, ints)
                else:
                    _Q8_4(arrays, ints)
