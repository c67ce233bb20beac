"""Write ``<name>.h`` / ``<name>.c``: plain C99, weights as ``const`` arrays, one static arena, no heap.

API (``model`` is the export's ``name``)::

    int model_run(const int8_t *in, int8_t *out);      /* int8 scores at MODEL_OUTPUT_SCALE          */
    int model_run_i32(const int8_t *in, int32_t *out); /* int32 scores at MODEL_OUTPUT_SCALE / 65536 */
    int model_run_float(const float *in, float *out);  /* with -DMODEL_FLOAT_API: quantizes the input */

``in`` holds ``round(x / MODEL_INPUT_SCALE)`` clamped to [-127, 127] (``prunekit.quant.layers``'s rule).
The functions return 0, or -1 for a NULL pointer. They are not reentrant (one static arena).
"""

from __future__ import annotations

import re

import numpy as np

from prunekit import __version__
from prunekit.errors import PrunekitError
from prunekit.export.c.budget import plan_arena, scratch_words
from prunekit.export.c.ir import INT32_HI, INT32_LO, IntGraph, Op
from prunekit.export.c.kernels import COMMON, KERNELS

_CTYPES = {
    np.dtype(np.int8): "int8_t",
    np.dtype(np.uint8): "uint8_t",
    np.dtype(np.uint16): "uint16_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.int64): "int64_t",
}
_FMT = {"dense": 0, "csr8": 1, "csr16": 2}


def c_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", name or ""):
        raise PrunekitError(
            f"--name must be a C identifier (letters, digits, _; not starting with a digit), got {name!r}"
        )
    return name


def _int(v: int) -> str:
    if v == INT32_LO:
        return "INT32_MIN"
    if v == INT32_HI:
        return "INT32_MAX"
    return str(int(v))


def _array(name: str, a: np.ndarray) -> str:
    """A const array definition (values 16 per line); None-like empty arrays are never emitted."""
    ctype = _CTYPES[a.dtype]
    vals = [f"INT64_C({int(v)})" if ctype == "int64_t" else str(int(v)) for v in a.reshape(-1)]
    body = ",\n".join("    " + ", ".join(vals[i : i + 16]) for i in range(0, len(vals), 16))
    return f"static const {ctype} {name}[{len(vals)}] = {{\n{body}\n}};"


def _float(x: float) -> str:
    return f"{float(np.float32(x)):.9g}f"


class _Writer:
    def __init__(self, g: IntGraph, name: str) -> None:
        self.g, self.name = g, name
        self.offsets, self.arena = plan_arena(g)
        self.arrays: list[tuple[str, np.ndarray]] = []
        self.descriptors: list[str] = []
        self.calls: list[str] = []

    def ptr(self, buf: str, const: bool = True) -> str:
        root = self.g.root(buf)
        if self.g.buffers[root].external:
            return "in"
        return f"a + {self.offsets[root]}"

    def add_array(self, name: str, a: np.ndarray | None) -> str:
        if a is None or a.size == 0:
            return "0"
        self.arrays.append((name, a))
        return name

    def op(self, i: int, op: Op) -> None:
        p, L = op.params, f"pk_L{i}"
        src = [self.ptr(b) for b in op.inputs]
        dst = self.ptr(op.output)
        comment = f"/* {op.kind} {op.name} */"
        if op.kind == "conv":
            st = op.stored
            val = self.add_array(f"pk_w{i}", st.val)
            idx = self.add_array(f"pk_i{i}", st.idx)
            ptr = self.add_array(f"pk_p{i}", st.ptr)
            m = self.add_array(f"pk_m{i}", op.arrays["mult"])
            s = self.add_array(f"pk_s{i}", op.arrays["shift"])
            b = self.add_array(f"pk_b{i}", op.arrays["bias"])
            dims = ", ".join(
                str(p[k])
                for k in (
                    "cin",
                    "h",
                    "w",
                    "cout",
                    "oh",
                    "ow",
                    "kh",
                    "kw",
                    "sy",
                    "sx",
                    "py",
                    "px",
                    "dy",
                    "dx",
                    "groups",
                )
            )
            ptr32 = int(st.ptr is not None and st.ptr.dtype == np.uint32)
            wide = int(self.g.buffers[op.output].wide)
            self.descriptors.append(
                f"static const pk_conv_t {L} = {{{dims}, {_FMT[st.fmt]}, {ptr32}, {wide}, {_int(op.lo)}, "
                f"{_int(op.hi)}, {val}, {idx}, {ptr}, {m}, {s}, {b}}}; {comment}"
            )
            self.calls.append(f"pk_conv({src[0]}, {dst}, pk_scratch, &{L});")
        elif op.kind == "add":
            n = self.g.buffers[op.output].numel
            self.descriptors.append(
                f"static const pk_add_t {L} = {{{n}, {p['ma']}, {p['mb']}, {p['shift']}, {op.lo}, {op.hi}}}; "
                f"{comment}"
            )
            self.calls.append(f"pk_add({src[0]}, {src[1]}, {dst}, &{L});")
        elif op.kind == "requant":
            n = self.g.buffers[op.output].numel
            self.descriptors.append(
                f"static const pk_requant_t {L} = {{{n}, {p['m']}, {p['shift']}, {op.lo}, {op.hi}}}; "
                f"{comment}"
            )
            self.calls.append(f"pk_requant({src[0]}, {dst}, &{L});")
        elif op.kind == "lut":
            t = self.add_array(f"pk_t{i}", op.arrays["table"])
            self.calls.append(f"pk_lut({src[0]}, {dst}, {self.g.buffers[op.output].numel}, {t}); {comment}")
        elif op.kind in ("maxpool", "avgpool"):
            dims = ", ".join(
                str(p[k]) for k in ("c", "h", "w", "oh", "ow", "kh", "kw", "sy", "sx", "py", "px")
            )
            avg = int(op.kind == "avgpool")
            self.descriptors.append(
                f"static const pk_pool_t {L} = {{{dims}, {avg}, {p['m']}, {p['shift']}, {op.lo}, {op.hi}}}; "
                f"{comment}"
            )
            self.calls.append(f"pk_pool({src[0]}, {dst}, &{L});")
        elif op.kind == "widen":
            n = self.g.buffers[op.output].numel
            self.calls.append(f"pk_widen({src[0]}, (int32_t *)(void *)({dst}), {n});")
        else:
            raise ValueError(op.kind)

    def source(self) -> tuple[str, str]:
        g, name = self.g, self.name
        for i, op in enumerate(g.ops):
            self.op(i, op)
        for op in g.ops:
            for dim in ("cin", "h", "w", "cout", "c"):
                if op.params.get(dim, 0) > 65535:
                    raise PrunekitError(
                        f"layer '{op.name}': {dim} = {op.params[dim]} is over the C export's 65535"
                    )
        kinds = []
        for op in g.ops:
            if KERNELS[op.kind] not in kinds:
                kinds.append(KERNELS[op.kind])
        # arrays grouped by alignment (largest first), so no padding sits between them
        arrays = sorted(self.arrays, key=lambda t: -t[1].dtype.itemsize)
        out_buf, in_buf = g.buffers[g.output], g.buffers[g.input]
        n_in, n_out = in_buf.numel, out_buf.numel
        words = max(1, (self.arena + 3) // 4)
        scratch = scratch_words(g)
        upper = name.upper()
        out_off = self.offsets[g.root(g.output)]
        c = [
            f"/* {name}.c: generated by prunekit {__version__} (prunekit export c). Plain C99: integer-only "
            "inference, no heap, no library calls. */",
            f'#include "{name}.h"',
            "",
            "#include <stddef.h>",
            COMMON.strip("\n"),
            *[k.strip("\n") for k in kinds],
            "",
            "/* weights and per-channel constants (flash) */",
            *[_array(n, a) for n, a in arrays],
            "",
            "/* operators */",
            *self.descriptors,
            "",
            f"/* activations (RAM): {self.arena} bytes laid out by liveness; conv scratch {4 * scratch} B */",
            f"static int32_t pk_arena[{words}];",
            *([f"static int32_t pk_scratch[{scratch}];"] if scratch else []),
            "",
            "static void pk_forward(const int8_t *in)",
            "{",
            "    int8_t *const a = (int8_t *)pk_arena;",
            *["    " + call for call in self.calls],
            "}",
            "",
            f"int {name}_run_i32(const int8_t *in, int32_t *out)",
            "{",
            f"    const int32_t *y = (const int32_t *)(void *)((int8_t *)pk_arena + {out_off});",
            "    int32_t i;",
            "    if (in == NULL || out == NULL) return -1;",
            "    pk_forward(in);",
            f"    for (i = 0; i < {n_out}; ++i) out[i] = y[i];",
            "    return 0;",
            "}",
            "",
            f"int {name}_run(const int8_t *in, int8_t *out)",
            "{",
            f"    const int32_t *y = (const int32_t *)(void *)((int8_t *)pk_arena + {out_off});",
            "    int32_t i;",
            "    if (in == NULL || out == NULL) return -1;",
            "    pk_forward(in);",
            f"    for (i = 0; i < {n_out}; ++i) out[i] = (int8_t)pk_clamp(pk_rshift(y[i], 16), -127, 127);",
            "    return 0;",
            "}",
            "",
            f"#ifdef {upper}_FLOAT_API",
            f"static int8_t pk_input[{n_in}];",
            "",
            "static int8_t pk_quantize(float v)",
            "{",
            "    /* round half to even and clamp to [-127, 127], as torch.round in prunekit.quant.layers */",
            "    int32_t t;",
            "    float f;",
            "    if (!(v == v)) return 0;",
            "    if (v >= 127.0f) return 127;",
            "    if (v <= -127.0f) return -127;",
            "    t = (int32_t)v;",
            "    f = v - (float)t;",
            "    if (f > 0.5f || (f == 0.5f && (t & 1))) ++t;",
            "    else if (f < -0.5f || (f == -0.5f && (t & 1))) --t;",
            "    return (int8_t)t;",
            "}",
            "",
            f"int {name}_run_float(const float *in, float *out)",
            "{",
            f"    const int32_t *y = (const int32_t *)(void *)((int8_t *)pk_arena + {out_off});",
            "    int32_t i;",
            "    if (in == NULL || out == NULL) return -1;",
            f"    for (i = 0; i < {n_in}; ++i) pk_input[i] = pk_quantize(in[i] / {upper}_INPUT_SCALE);",
            "    pk_forward(pk_input);",
            f"    for (i = 0; i < {n_out}; ++i) out[i] = (float)y[i] * ({upper}_OUTPUT_SCALE / 65536.0f);",
            "    return 0;",
            "}",
            "#endif",
            "",
        ]
        s_out = out_buf.scale * 65536
        h = [
            f"/* {name}.h: generated by prunekit {__version__} (prunekit export c) */",
            f"#ifndef {upper}_H",
            f"#define {upper}_H",
            "",
            "#include <stdint.h>",
            "",
            "#ifdef __cplusplus",
            'extern "C" {',
            "#endif",
            "",
            f"#define {upper}_INPUT_SIZE {n_in} /* int8, shape {'x'.join(map(str, in_buf.shape))} */",
            f"#define {upper}_OUTPUT_SIZE {n_out}",
            "/* input: q = round(x / INPUT_SCALE), clamped to [-127, 127] */",
            f"#define {upper}_INPUT_SCALE {_float(in_buf.scale)}",
            "/* output: int8 y = q * OUTPUT_SCALE; int32 y = q * OUTPUT_SCALE / 65536 */",
            f"#define {upper}_OUTPUT_SCALE {_float(s_out)}",
            f"#define {upper}_ARENA_BYTES {4 * words}",
            f"#define {upper}_SCRATCH_BYTES {4 * scratch}",
            "",
            f"int {name}_run(const int8_t *in, int8_t *out);",
            f"int {name}_run_i32(const int8_t *in, int32_t *out);",
            f"#ifdef {upper}_FLOAT_API",
            f"int {name}_run_float(const float *in, float *out);",
            "#endif",
            "",
            "#ifdef __cplusplus",
            "}",
            "#endif",
            "",
            f"#endif /* {upper}_H */",
            "",
        ]
        return "\n".join(h), "\n".join(c)


def generate(g: IntGraph, name: str) -> tuple[str, str]:
    """``(header, source)`` text of the model."""
    return _Writer(g, c_name(name)).source()
