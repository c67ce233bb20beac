"""Batch-1 kernels for decoding: ``y = W x`` with one activation vector, the weight in a sparse layout.

At batch 1 every weight is used once per call, so a layer costs the bytes it streams (weights far larger than
the caches) or the instructions per kept weight (weights in cache). The layouts here cut both: one
activation lookup feeds several multiply-adds, and the index bytes per kept weight are few.

* ``dense_gemv``: the dense reference, 16 lanes, 4 accumulators (a plain loop numba compiles well; at batch 1
  it streams weights at the machine's bandwidth, 1.5-2.4x faster than torch's float32 GEMV measured here).
* ``block_gemv``: blocks of R x 1 along the output (R = 4, 8, 16; XNNPACK's and DeepSparse's layout). Per
  block-row (R consecutive outputs) a uint16 input column per kept block and its R values contiguous: one
  broadcast of ``x[col]`` feeds one R-wide FMA. ``(1 - s)(v + 2/R)`` bytes per weight.
* ``nm_gemv_avx512`` / ``nm_gemv_avx2``: N:M with N = M/2 (2:4, 4:8) along the input, the positions in
  ``log2(M)`` bits (4 bits for 4:8), rows interleaved in groups of 8 so the kernel reads 2 sequential streams
  (16 concurrent streams defeat the DRAM prefetchers). AVX-512: ``vpermt2ps`` picks 16 activations out of 32;
  AVX2: two ``vpermps`` and a blend pick 8 out of 16.
* ``csr4_gemv``: unstructured CSR with uint16 columns, rows padded to a multiple of 4 non-zeros: one 64-bit
  load gives 4 columns, 4 scalar loads fill one vector, one 4-wide FMA. (A plain CSR loop is
  auto-vectorised by LLVM into slow 512-bit gathers on Zen 4.)
* ``block_q_gemv`` / ``block_vnni_gemv``: int8 weights times int8 activations with exact int32 sums (the
  generic one multiplies in int32 lanes, the AVX-512 VNNI one runs ``vpdpbusd`` on groups of 4 kept blocks).

Values are float32, bfloat16 (stored as uint16, widened with one shift) or int8 (one float32 scale per output
row, applied once at the end); the kernels pick the conversion from the value array's dtype. Activations
are float32 except for the ``_q``/``_vnni`` kernels. Every driver takes a range of row units (rows, block
rows, row groups) so callers can split a call over threads.

The ``*_avx512`` kernels use AVX-512 instructions and must only be called (so compiled) when
``prunekit.runtime.cpu.features()`` says so; the rest is target-independent LLVM IR that numba compiles for
the host. The intrinsics live in this file, next to the drivers, because numba's disk cache is keyed on the
source file of the cached function.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from prunekit.runtime.gemv_formats import ROW_GROUP, nm_chunk, nm_meta_bits
from prunekit.runtime.kernels import emit_loop

log = logging.getLogger(__name__)


def _jit(fastmath: bool = True) -> Callable:
    """``numba.njit`` (nogil, no bounds checks) with the disk cache when a cache location is writable."""

    def wrap(fn: Callable) -> Callable:
        opts = dict(nogil=True, boundscheck=False, fastmath=fastmath)
        if os.environ.get("PRUNEKIT_NUMBA_CACHE", "1") != "0":
            try:
                return numba.njit(cache=True, **opts)(fn)
            except Exception as exc:  # noqa: BLE001 - any cache failure means: run uncached
                log.info("numba disk cache unavailable for %s (%s); compiling in memory", fn.__name__, exc)
        return numba.njit(**opts)(fn)

    return wrap


# -- LLVM IR helpers ------------------------------------------------------------------------------------
_F32, _I1, _I8, _I16, _I32, _I64 = (
    ir.FloatType(),
    ir.IntType(1),
    ir.IntType(8),
    ir.IntType(16),
    ir.IntType(32),
    ir.IntType(64),
)


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _i64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _kind(dtype) -> str:
    """The stored value type of a numba array dtype: f32, bf16 (uint16 bits) or i8."""
    if dtype == types.float32:
        return "f32"
    if dtype == types.uint16:
        return "bf16"
    if dtype == types.int8:
        return "i8"
    raise numba.core.errors.TypingError(f"values must be float32, uint16 (bfloat16) or int8, got {dtype}")


_STORED = {"f32": _F32, "bf16": _I16, "i8": _I8}


class _Builder:
    """The few IR patterns the kernels share: vector loads at an element offset, splats, FMA, sums, loops
    whose carried values (the accumulators) stay SSA values and so stay in registers."""

    def __init__(self, context, builder: ir.IRBuilder) -> None:
        self.c, self.b = context, builder

    def data(self, nbtype, value) -> ir.Value:
        return self.c.make_array(nbtype)(self.c, self.b, value).data

    def load(self, ptr: ir.Value, offset: ir.Value) -> ir.Value:
        return self.b.load(self.b.gep(ptr, [offset]))

    def vload(self, ptr: ir.Value, offset: ir.Value, vty: ir.VectorType) -> ir.Value:
        load = self.b.load(self.b.bitcast(self.b.gep(ptr, [offset]), vty.as_pointer()))
        load.align = 1
        return load

    def load_as(self, ptr: ir.Value, byte_offset: ir.Value, t: ir.Type) -> ir.Value:
        """A ``t`` read at a byte offset of an array (several packed indices in one load)."""
        raw = self.b.bitcast(ptr, _I8.as_pointer())
        load = self.b.load(self.b.bitcast(self.b.gep(raw, [byte_offset]), t.as_pointer()))
        load.align = 1
        return load

    def vstore(self, v: ir.Value, ptr: ir.Value, offset: ir.Value) -> None:
        store = self.b.store(v, self.b.bitcast(self.b.gep(ptr, [offset]), v.type.as_pointer()))
        store.align = 1

    def const(self, t: ir.Type, values) -> ir.Constant:
        values = list(values)
        return ir.Constant(_vec(t, len(values)), values)

    def zero(self, t: ir.Type, n: int) -> ir.Constant:
        return ir.Constant(_vec(t, n), [0.0 if t == _F32 else 0] * n)

    def splat(self, s: ir.Value, n: int) -> ir.Value:
        undef = ir.Constant(_vec(s.type, n), ir.Undefined)
        one = self.b.insert_element(undef, s, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(one, undef, ir.Constant(_vec(_I32, n), [0] * n))

    def shuffle(self, a: ir.Value, b: ir.Value, mask) -> ir.Value:
        mask = list(mask)
        return self.b.shuffle_vector(a, b, ir.Constant(_vec(_I32, len(mask)), mask))

    def function(self, name: str, ret: ir.Type, args: list) -> ir.Function:
        found = self.b.module.globals.get(name)
        return (
            found if found is not None else ir.Function(self.b.module, ir.FunctionType(ret, args), name=name)
        )

    def fma(self, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
        n = a.type.count
        return self.b.call(self.function(f"llvm.fma.v{n}f32", _vec(_F32, n), [_vec(_F32, n)] * 3), [a, b, c])

    def to_f32(self, v: ir.Value, kind: str) -> ir.Value:
        """Stored values -> float32 lanes: bf16 bits shifted into the high half, int8 sign-extended."""
        n = v.type.count
        if kind == "bf16":
            wide = self.b.shl(self.b.zext(v, _vec(_I32, n)), ir.Constant(_vec(_I32, n), [16] * n))
            return self.b.bitcast(wide, _vec(_F32, n))
        if kind == "i8":  # through int32 lanes: vpmovsxbd + vcvtdq2ps
            return self.b.sitofp(self.b.sext(v, _vec(_I32, n)), _vec(_F32, n))
        return v

    def add(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.b.add(a, b) if isinstance(a.type.element, ir.IntType) else self.b.fadd(a, b)

    def hsum(self, v: ir.Value) -> ir.Value:
        n = v.type.count
        while n > 1:
            n //= 2
            v = self.add(self.shuffle(v, v, range(n)), self.shuffle(v, v, range(n, 2 * n)))
        return self.b.extract_element(v, ir.Constant(_I32, 0))

    def vsum(self, vs: list) -> ir.Value:
        while len(vs) > 1:
            vs = [self.add(vs[i], vs[i + 1]) for i in range(0, len(vs) - 1, 2)] + vs[len(vs) & ~1 :]
        return vs[0]

    def loop(self, lo: ir.Value, hi: ir.Value, carried: list, body: Callable) -> list:
        """``for k in [lo, hi): carried = body(k, carried)``; the final carried values."""
        return emit_loop(self.b, lo, hi, carried, body, "gemv")

    def streams(self, lo: ir.Value, hi: ir.Value, unroll: int, accs: list, step: Callable) -> list:
        """``acc = step(k, acc)`` for k in [lo, hi) on ``unroll`` independent accumulators (k = lo + unroll t
        + s uses accumulator s; the tail runs on accumulator 0): one FMA chain is latency-bound."""
        b = self.b
        n = b.sdiv(b.sub(hi, lo), _i64(unroll))

        def body(t, car):
            base = b.add(lo, b.mul(t, _i64(unroll)))
            return [step(b.add(base, _i64(s)), car[s]) for s in range(unroll)]

        accs = self.loop(_i64(0), n, accs, body)
        tail = self.loop(b.add(lo, b.mul(n, _i64(unroll))), hi, [accs[0]], lambda k, c: [step(k, c[0])])
        return tail + accs[1:]


def _literal(value, name: str) -> int:
    if not isinstance(value, types.IntegerLiteral):
        raise numba.core.errors.TypingError(f"{name} must be a compile-time integer constant")
    return value.literal_value


# -- dense ----------------------------------------------------------------------------------------------
@intrinsic(prefer_literal=True)
def _dense_row(typingctx, w, offset, count, x):
    """``sum_{k < count} w[offset + k] * x[k]``: 16 lanes, 4 accumulators, then a scalar tail."""
    kind = _kind(w.dtype)

    def codegen(context, builder, signature, args):
        k = _Builder(context, builder)
        wp, xp = k.data(signature.args[0], args[0]), k.data(signature.args[3], args[3])
        off, n = args[1], args[2]
        t = _STORED[kind]

        def step(width: int) -> Callable:
            def fma(c, acc):  # elements [width c, width c + width)
                at = builder.mul(c, _i64(width))
                w_ = k.to_f32(k.vload(wp, builder.add(off, at), _vec(t, width)), kind)
                return k.fma(w_, k.vload(xp, at, _vec(_F32, width)), acc)

            return fma

        chunks = builder.sdiv(n, _i64(16))
        total = k.hsum(k.vsum(k.streams(_i64(0), chunks, 4, [k.zero(_F32, 16)] * 4, step(16))))
        (rest,) = k.loop(builder.mul(chunks, _i64(16)), n, [k.zero(_F32, 1)], lambda c, a: [step(1)(c, a[0])])
        return builder.fadd(total, builder.extract_element(rest, ir.Constant(_I32, 0)))

    return types.float32(w, offset, count, x), codegen


@_jit()
def dense_gemv(w, scale, x, bias, y, r0, r1):
    """``y[r] = (sum_k w[r, k] x[k]) * scale[r] + bias[r]`` for rows ``[r0, r1)``; ``scale`` only for int8
    values, ``bias`` only when it has elements. ``w`` is C-contiguous (out, in)."""
    inn = x.shape[0]
    flat = w.reshape(-1)
    scaled, biased = scale.shape[0] > 0, bias.shape[0] > 0
    for r in range(r0, r1):
        acc = _dense_row(flat, np.int64(r * inn), np.int64(inn), x)
        if scaled:
            acc *= scale[r]
        y[r] = acc + bias[r] if biased else acc


# -- block R x 1 ----------------------------------------------------------------------------------------
@intrinsic(prefer_literal=True)
def _block_tile(typingctx, idx, vals, lo, hi, x, scale, y, y0, rows):
    """``y[y0 : y0 + R] = sum_{j in [lo, hi)} vals[j, :] * x[idx[j]]`` (``* scale[y0 : y0 + R]`` for int8)."""
    R = _literal(rows, "rows")
    kind = _kind(vals.dtype)

    def codegen(context, builder, signature, args):
        k = _Builder(context, builder)
        ip, vp, xp, sp, yp = (k.data(signature.args[i], args[i]) for i in (0, 1, 4, 5, 6))
        y0 = args[7]

        def step(j, acc):
            col = builder.zext(k.load(ip, j), _I64)
            w = k.to_f32(k.vload(vp, builder.mul(j, _i64(R)), _vec(_STORED[kind], R)), kind)
            return k.fma(w, k.splat(k.load(xp, col), R), acc)

        total = k.vsum(k.streams(args[2], args[3], 4, [k.zero(_F32, R)] * 4, step))
        if kind == "i8":
            total = builder.fmul(total, k.vload(sp, y0, _vec(_F32, R)))
        k.vstore(total, yp, y0)
        return context.get_dummy_value()

    return types.void(idx, vals, lo, hi, x, scale, y, y0, rows), codegen


@_jit()
def block_gemv(ptr, idx, vals, scale, x, bias, y, rows, b0, b1):
    """Block-rows ``[b0, b1)`` of an R x 1 block layout (``rows`` = R in 4, 8, 16): block-row ``b`` keeps the
    blocks ``ptr[b] .. ptr[b+1]``, block ``j`` at input column ``idx[j]`` with values ``vals[j*R : j*R+R]``
    for outputs ``b*R .. b*R+R``. ``y`` has ``len(ptr) - 1`` block-rows of outputs."""
    biased = bias.shape[0] > 0
    for b in range(b0, b1):
        if rows == 8:
            _block_tile(idx, vals, ptr[b], ptr[b + 1], x, scale, y, np.int64(b * 8), 8)
        elif rows == 16:
            _block_tile(idx, vals, ptr[b], ptr[b + 1], x, scale, y, np.int64(b * 16), 16)
        else:
            _block_tile(idx, vals, ptr[b], ptr[b + 1], x, scale, y, np.int64(b * 4), 4)
        if biased:
            for r in range(b * rows, (b + 1) * rows):
                y[r] += bias[r]


# -- N:M (N = M/2), rows interleaved in groups of 8 ------------------------------------------------------
def _nm_codegen(isa: str, m: int, kind: str) -> Callable:
    L, IN = nm_chunk(isa)
    n = m // 2
    bits = nm_meta_bits(m)
    meta_bytes = L * bits // 8

    def codegen(context, builder, signature, args):
        k = _Builder(context, builder)
        mp, vp, xp, sp, yp = (k.data(signature.args[i], args[i]) for i in range(5))
        u0, steps, r0 = args[5], args[6], args[7]
        if isa == "avx512":
            perm = k.function(
                "llvm.x86.avx512.vpermi2var.ps.512",
                _vec(_F32, 16),
                [_vec(_F32, 16), _vec(_I32, 16), _vec(_F32, 16)],
            )
            base = k.const(_I32, [m * (j // n) for j in range(16)])
        else:
            perm = k.function("llvm.x86.avx2.permps", _vec(_F32, 8), [_vec(_F32, 8), _vec(_I32, 8)])
            base = k.const(_I32, [(m * (j // n)) % 8 for j in range(8)])
        per_word = 32 // bits  # positions per 32-bit word
        shifts = k.const(_I32, [bits * (j % per_word) for j in range(L)])
        mask = k.const(_I32, [m - 1] * L)

        def positions(u):
            if meta_bytes <= 4:
                t = _I32 if meta_bytes == 4 else _I16
                word = k.load_as(mp, builder.mul(u, _i64(meta_bytes)), t)
                return k.splat(builder.zext(word, _I32) if t != _I32 else word, L)
            words = k.load_as(mp, builder.mul(u, _i64(meta_bytes)), _vec(_I32, meta_bytes // 4))
            return k.shuffle(words, words, [j // per_word for j in range(L)])

        def body(c, accs):
            x0 = k.vload(xp, builder.mul(c, _i64(IN)), _vec(_F32, L))
            x1 = k.vload(xp, builder.add(builder.mul(c, _i64(IN)), _i64(L)), _vec(_F32, L))
            ub = builder.add(u0, builder.mul(c, _i64(ROW_GROUP)))
            out = []
            for q in range(ROW_GROUP):
                u = builder.add(ub, _i64(q))
                idx = builder.add(builder.and_(builder.lshr(positions(u), shifts), mask), base)
                if isa == "avx512":
                    xs = builder.call(perm, [x0, idx, x1])
                else:
                    xs = k.shuffle(
                        builder.call(perm, [x0, idx]),
                        builder.call(perm, [x1, idx]),
                        [0, 1, 2, 3, 12, 13, 14, 15],
                    )
                w = k.to_f32(k.vload(vp, builder.mul(u, _i64(L)), _vec(_STORED[kind], L)), kind)
                out.append(k.fma(w, xs, accs[q]))
            return out

        accs = k.loop(_i64(0), steps, [k.zero(_F32, L)] * ROW_GROUP, body)
        for q in range(ROW_GROUP):
            r = builder.add(r0, _i64(q))
            total = k.hsum(accs[q])
            if kind == "i8":
                total = builder.fmul(total, k.load(sp, r))
            builder.store(total, builder.gep(yp, [r]))
        return context.get_dummy_value()

    return codegen


def _nm_tile(isa: str):
    @intrinsic(prefer_literal=True)
    def tile(typingctx, meta, vals, x, scale, y, u0, steps, r0, m):
        codegen = _nm_codegen(isa, _literal(m, "m"), _kind(vals.dtype))
        return types.void(meta, vals, x, scale, y, u0, steps, r0, m), codegen

    return tile


_nm_tile_avx512, _nm_tile_avx2 = _nm_tile("avx512"), _nm_tile("avx2")


@_jit()
def nm_gemv_avx512(meta, vals, scale, x, bias, y, m, g0, g1):
    """Row groups ``[g0, g1)`` of the interleaved N:M layout (``m`` = 4 or 8, N = m/2), 32 inputs per step.
    Needs AVX-512 F."""
    steps = np.int64(x.shape[0] // 32)
    for g in range(g0, g1):
        if m == 8:
            _nm_tile_avx512(meta, vals, x, scale, y, np.int64(g * 8 * steps), steps, np.int64(g * 8), 8)
        else:
            _nm_tile_avx512(meta, vals, x, scale, y, np.int64(g * 8 * steps), steps, np.int64(g * 8), 4)
    if bias.shape[0] > 0:
        for r in range(g0 * 8, g1 * 8):
            y[r] += bias[r]


@_jit()
def nm_gemv_avx2(meta, vals, scale, x, bias, y, m, g0, g1):
    """As :func:`nm_gemv_avx512` with 16 inputs per step on AVX2 (needs AVX2 + FMA)."""
    steps = np.int64(x.shape[0] // 16)
    for g in range(g0, g1):
        if m == 8:
            _nm_tile_avx2(meta, vals, x, scale, y, np.int64(g * 8 * steps), steps, np.int64(g * 8), 8)
        else:
            _nm_tile_avx2(meta, vals, x, scale, y, np.int64(g * 8 * steps), steps, np.int64(g * 8), 4)
    if bias.shape[0] > 0:
        for r in range(g0 * 8, g1 * 8):
            y[r] += bias[r]


# -- unstructured: CSR padded to 4 per row ---------------------------------------------------------------
@intrinsic(prefer_literal=True)
def _csr4_row(typingctx, idx, vals, lo, count, x):
    """``sum`` over ``count`` groups of 4 non-zeros from ``lo``: one 64-bit load of 4 uint16 columns, 4 scalar
    activation loads into one vector, one 4-wide FMA (1.5 loads per non-zero instead of 3)."""
    kind = _kind(vals.dtype)

    def codegen(context, builder, signature, args):
        k = _Builder(context, builder)
        ip, vp, xp = (k.data(signature.args[i], args[i]) for i in (0, 1, 4))
        lo = args[2]

        def step(t, acc):
            j = builder.add(lo, builder.mul(t, _i64(4)))
            word = k.load_as(ip, builder.mul(j, _i64(2)), _I64)
            xv = ir.Constant(_vec(_F32, 4), ir.Undefined)
            for e in range(4):
                col = builder.and_(builder.lshr(word, _i64(16 * e)), _i64(0xFFFF))
                xv = builder.insert_element(xv, k.load(xp, col), ir.Constant(_I32, e))
            return k.fma(k.to_f32(k.vload(vp, j, _vec(_STORED[kind], 4)), kind), xv, acc)

        return k.hsum(k.vsum(k.streams(_i64(0), args[3], 4, [k.zero(_F32, 4)] * 4, step)))

    return types.float32(idx, vals, lo, count, x), codegen


@_jit()
def csr4_gemv(ptr, idx, vals, scale, x, bias, y, r0, r1):
    """Rows ``[r0, r1)`` of a CSR whose rows hold a multiple of 4 entries (padding: column 0, value 0)."""
    scaled, biased = scale.shape[0] > 0, bias.shape[0] > 0
    for r in range(r0, r1):
        lo = ptr[r]
        acc = _csr4_row(idx, vals, lo, np.int64((ptr[r + 1] - lo) // 4), x)
        if scaled:
            acc *= scale[r]
        y[r] = acc + bias[r] if biased else acc


# -- int8 x int8, exact int32 sums -------------------------------------------------------------------------
@intrinsic(prefer_literal=True)
def _block_q_tile(typingctx, idx, vals, lo, hi, xq, acc, y0, rows):
    """``acc[y0 : y0 + R] = sum_j vals[j, :] * xq[idx[j]]`` in int32 lanes (exact; any x86 vector ISA)."""
    R = _literal(rows, "rows")

    def codegen(context, builder, signature, args):
        k = _Builder(context, builder)
        ip, vp, xp, ap = (k.data(signature.args[i], args[i]) for i in (0, 1, 4, 5))

        def step(j, a):
            col = builder.zext(k.load(ip, j), _I64)
            xv = k.splat(builder.sext(k.load(xp, col), _I32), R)
            w = builder.sext(k.vload(vp, builder.mul(j, _i64(R)), _vec(_I8, R)), _vec(_I32, R))
            return builder.add(a, builder.mul(w, xv))

        k.vstore(k.vsum(k.streams(args[2], args[3], 4, [k.zero(_I32, R)] * 4, step)), ap, args[6])
        return context.get_dummy_value()

    return types.void(idx, vals, lo, hi, xq, acc, y0, rows), codegen


@_jit()
def block_q_gemv(ptr, idx, vals, xq, acc, rows, b0, b1):
    """Exact ``acc = q_w @ x_q`` (int32) on the R x 1 block layout with int8 values, int8 activations."""
    for b in range(b0, b1):
        if rows == 8:
            _block_q_tile(idx, vals, ptr[b], ptr[b + 1], xq, acc, np.int64(b * 8), 8)
        elif rows == 16:
            _block_q_tile(idx, vals, ptr[b], ptr[b + 1], xq, acc, np.int64(b * 16), 16)
        else:
            _block_q_tile(idx, vals, ptr[b], ptr[b + 1], xq, acc, np.int64(b * 4), 4)


@intrinsic(prefer_literal=True)
def _block_vnni_tile(typingctx, idx, vals, lo, hi, xu, acc, y0, rows):
    """Groups ``[lo, hi)`` of 4 kept blocks: the 4 activations (uint8, ``x_q + 128``) packed in one int32 and
    broadcast, the R x 4 weight bytes (lane r holds w[r, c0..c3]) -> one ``vpdpbusd`` = 4R multiply-adds."""
    R = _literal(rows, "rows")
    width = {4: "128", 8: "256", 16: "512"}[R]

    def codegen(context, builder, signature, args):
        k = _Builder(context, builder)
        ip, vp, xp, ap = (k.data(signature.args[i], args[i]) for i in (0, 1, 4, 5))
        dot = k.function(
            f"llvm.x86.avx512.vpdpbusd.{width}",
            _vec(_I32, R),
            [_vec(_I32, R), _vec(_I8, 4 * R), _vec(_I8, 4 * R)],
        )

        def step(g, a):
            word = k.load_as(ip, builder.mul(g, _i64(8)), _I64)
            packed = None
            for e in range(4):
                col = builder.and_(builder.lshr(word, _i64(16 * e)), _i64(0xFFFF))
                byte = builder.zext(k.load(xp, col), _I32)
                byte = builder.shl(byte, ir.Constant(_I32, 8 * e)) if e else byte
                packed = byte if packed is None else builder.or_(packed, byte)
            xv = builder.bitcast(k.splat(packed, R), _vec(_I8, 4 * R))
            w = k.vload(vp, builder.mul(g, _i64(4 * R)), _vec(_I8, 4 * R))
            return builder.call(dot, [a, xv, w])

        k.vstore(k.vsum(k.streams(args[2], args[3], 4, [k.zero(_I32, R)] * 4, step)), ap, args[6])
        return context.get_dummy_value()

    return types.void(idx, vals, lo, hi, xu, acc, y0, rows), codegen


@_jit()
def block_vnni_gemv(gptr, idx, vals, xu, wsum128, acc, rows, b0, b1):
    """Exact ``acc = q_w @ x_q`` (int32) on the VNNI block layout: ``(x_q + 128) . w - 128 sum(w)``. Needs
    AVX-512 VNNI."""
    for b in range(b0, b1):
        if rows == 8:
            _block_vnni_tile(idx, vals, gptr[b], gptr[b + 1], xu, acc, np.int64(b * 8), 8)
        elif rows == 16:
            _block_vnni_tile(idx, vals, gptr[b], gptr[b + 1], xu, acc, np.int64(b * 16), 16)
        else:
            _block_vnni_tile(idx, vals, gptr[b], gptr[b + 1], xu, acc, np.int64(b * 4), 4)
        for r in range(b * rows, (b + 1) * rows):
            acc[r] -= wsum128[r]


# -- int8 activation glue: no fastmath, rounding exactly as prunekit.quant.rounding ------------------------
@_jit(fastmath=False)
def quantize_activation(x, xq, xu):
    """Dynamic per-tensor int8: ``s = max|x| / 127`` (1 for all zeros), ``xq = clamp(rint(x / s), +-127)``
    and ``xu = xq + 128`` (the unsigned operand of ``vpdpbusd``); returns ``s`` (float32)."""
    top = np.float32(0.0)
    for v in x:
        a = abs(v)
        if a > top:
            top = a
    s = top / np.float32(127.0) if top > 0 else np.float32(1.0)
    return quantize_static(x, s, xq, xu)


@_jit(fastmath=False)
def quantize_static(x, s, xq, xu):
    """Per-tensor int8 at the scale ``s`` (float32; a calibrated ``act_scale``): ``xq = clamp(rint(x / s),
    +-127)``, ``xu = xq + 128``; returns ``s``."""
    for i in range(x.shape[0]):
        q = min(max(np.rint(x[i] / s), np.float32(-127.0)), np.float32(127.0))
        xq[i] = np.int8(q)
        xu[i] = np.uint8(np.int32(q) + 128)
    return s


@_jit(fastmath=False)
def finish_int8(acc, s_x, weight_scale, bias, y, r0, r1):
    """``y[r] = float32(acc[r]) * (s_x * weight_scale[r]) (+ bias[r])``: one product, then one sum."""
    biased = bias.shape[0] > 0
    for r in range(r0, r1):
        v = np.float32(acc[r]) * (np.float32(s_x) * weight_scale[r])
        y[r] = v + bias[r] if biased else v
