"""Lower a captured integer model to the integer graph the C code and the NumPy reference execute.

Nothing is chosen here: every scale, multiplier, shift and bias comes from the integer model's modules
(:mod:`prunekit.quant.graph`), so the C library computes the integers the PyTorch model computes. What
lowering adds is layout: a ReLU that is the sole reader of an operator's output is fused into that
operator's clamp (``[0, 127]`` instead of ``[-127, 127]`` then a ReLU: the same integers), flatten and
identities alias their input, and a final operator other than an int8 layer is widened to the int32
output form (``q * 65536`` at ``scale / 65536``), so the C API always has one int32 output.
"""

from __future__ import annotations

import numpy as np

from prunekit.errors import PrunekitError
from prunekit.export.c.graph import Graph, Node
from prunekit.export.c.ir import INT8_HI, INT8_LO, INT32_HI, INT32_LO, WIDE, Buffer, IntGraph, Op
from prunekit.quant.rounding import multiplier

IDENTITY = multiplier(1.0)  # (2**30, 30): requantizing to the same scale changes nothing


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Lowering:
    def __init__(self, g: Graph) -> None:
        self.g, self.users = g, g.users()
        self.buffers: dict[str, Buffer] = {}
        self.ops: list[Op] = []
        self.produced: dict[str, str] = {}
        self.fused: set[str] = set()

    def buffer(self, name: str, shape: tuple[int, ...], scale: float, **kw) -> str:
        self.buffers[name] = Buffer(name, tuple(int(d) for d in shape), float(scale), **kw)
        return name

    def target(self, n: Node, lo: int = INT8_LO, hi: int = INT8_HI) -> tuple[Node, int, int]:
        """The node whose value ``n``'s operator writes (its sole ReLU reader, fused) and the clamp."""
        us = self.users[n.name]
        if n.name != self.g.output and len(us) == 1 and us[0].kind == "relu" and us[0].name != self.g.output:
            self.fused.add(us[0].name)
            return us[0], max(lo, 0), hi
        return n, lo, hi

    def src(self, name: str) -> Buffer:
        return self.buffers[self.produced[name]]

    def emit(self, n: Node, op: Op, t: Node) -> None:
        self.ops.append(op)
        self.produced[n.name] = self.produced[t.name] = op.output

    def run(self) -> IntGraph:
        g = self.g
        self.produced[g.nodes[0].name] = "input"
        for n in g.nodes[1:]:
            if n.name not in self.fused:
                getattr(self, f"_{n.kind}")(n)
        if self.produced[g.output] != "output":  # a final operator other than an int8 layer
            src = self.src(g.output)
            self.buffer("output", src.shape, src.scale / WIDE, wide=True)
            self.ops.append(Op("widen", "output", [src.name], "output", INT32_LO, INT32_HI))
        return IntGraph(self.buffers, self.ops, "input", "output")

    # -- operators -------------------------------------------------------------------------------------
    def _quantize(self, n: Node) -> None:
        self.buffer("input", n.shape, float(n.module.scale), external=True)
        self.produced[n.name] = "input"

    def _conv(self, n: Node) -> None:
        m = n.module
        src = self.src(n.inputs[0])
        linear = len(n.shape) == 1
        if linear != (len(src.shape) == 1):
            raise PrunekitError(
                f"layer '{n.path}': a Linear needs a flat (N, features) input here (flatten first), "
                f"a Conv2d an (N, C, H, W) one; got input shape {src.shape}"
            )
        if src.scale != float(m.act_scale):  # integerize gives readers their input's scale
            raise PrunekitError(f"layer '{n.path}': input scale {src.scale} differs from its act_scale")
        cin, h, w = (src.shape[0], 1, 1) if linear else src.shape
        cout, oh, ow = (n.shape[0], 1, 1) if linear else n.shape
        lo, hi = (int(v) for v in m.out_range)
        wide = m.wide
        t, lo, hi = (n, lo, hi) if wide else self.target(n, lo, hi)
        out = self.buffer("output" if wide else t.name, t.shape, float(m.out_scale), wide=wide)
        mult = m.out_mult.numpy().astype(np.int64)
        kh, kw = (1, 1) if linear else _pair(m.kernel_size)
        stride, pad, dil = ((1, 1),) * 2 + ((1, 1),) if linear else (m.stride, m.padding, m.dilation)
        params = dict(
            cin=cin, h=h, w=w, cout=cout, oh=oh, ow=ow, kh=kh, kw=kw, groups=int(getattr(m, "groups", 1))
        )
        (sy, sx), (py, px), (dy, dx) = _pair(stride), (0, 0) if linear else _pair(pad), _pair(dil)
        params.update(sy=sy, sx=sx, py=py, px=px, dy=dy, dx=dx, linear=linear)
        arrays = {
            "weight": m.weight_q.numpy().astype(np.int8).reshape(cout, -1),
            "mult": mult.astype(np.int32),
            "shift": m.out_shift.numpy().astype(np.int8),
            "bias": m.bias_q.numpy().astype(np.int64) * mult,  # (acc + bias_q) * M = acc * M + bias
        }
        self.emit(n, Op("conv", n.path, [src.name], out, lo, hi, params, arrays), t)

    def _add(self, n: Node) -> None:
        a, b = (self.src(i) for i in n.inputs)
        if a.shape != b.shape:
            raise PrunekitError(f"add at '{n.path}': shapes {a.shape} and {b.shape} differ (no broadcasting)")
        t, lo, hi = self.target(n)
        out = self.buffer(t.name, t.shape, float(n.module.scale_out))
        ma, mb, sh = (int(c) for c in n.module.consts)
        self.emit(n, Op("add", n.path, [a.name, b.name], out, lo, hi, {"ma": ma, "mb": mb, "shift": sh}), t)

    def _requant(
        self, n: Node, kind: str, m_sh: tuple[int, int], lo: int, hi: int, scale: float, params=None
    ):
        src = self.src(n.inputs[0])
        t, lo, hi = (n, lo, hi) if n.kind == "relu" else self.target(n, lo, hi)
        out = self.buffer(t.name, t.shape, scale)
        op = Op(kind, n.path, [src.name], out, lo, hi, {"m": m_sh[0], "shift": m_sh[1], **(params or {})})
        self.emit(n, op, t)

    def _relu(self, n: Node) -> None:
        self._requant(n, "requant", IDENTITY, 0, INT8_HI, self.src(n.inputs[0]).scale)

    def _relu6(self, n: Node) -> None:
        self._requant(n, "requant", IDENTITY, 0, n.module.hi, float(n.module.scale))

    def _pool_params(self, n: Node, kernel, stride, padding) -> dict:
        c, h, w = self.src(n.inputs[0]).shape
        oh, ow = (1, 1) if len(n.shape) != 3 else n.shape[1:]
        (kh, kw), (sy, sx), (py, px) = _pair(kernel), _pair(stride), _pair(padding)
        return dict(c=c, h=h, w=w, oh=oh, ow=ow, kh=kh, kw=kw, sy=sy, sx=sx, py=py, px=px)

    def _maxpool(self, n: Node) -> None:
        src = self.src(n.inputs[0])
        if len(src.shape) != 3:
            raise PrunekitError(f"max pooling at '{n.path}' needs an (N, C, H, W) input")
        m = n.module
        p = self._pool_params(n, m.kernel_size, m.kernel_size if m.stride is None else m.stride, m.padding)
        self._requant(n, "maxpool", IDENTITY, INT8_LO, INT8_HI, src.scale, p)

    def _avgpool(self, n: Node) -> None:
        m = n.module
        p = self._pool_params(n, m.kernel_size, m.stride, m.padding)
        self._requant(n, "avgpool", m.multiplier(p["kh"] * p["kw"]), INT8_LO, INT8_HI, float(m.scale_out), p)

    def _gap(self, n: Node) -> None:
        src = self.src(n.inputs[0])
        if len(src.shape) != 3:
            raise PrunekitError(f"global average pooling at '{n.path}' needs an (N, C, H, W) input")
        m = n.module
        c, h, w = src.shape
        p = dict(c=c, h=h, w=w, oh=1, ow=1, kh=h, kw=w, sy=1, sx=1, py=0, px=0)
        self._requant(n, "avgpool", m.multiplier(h * w), INT8_LO, INT8_HI, float(m.scale_out), p)

    def _flatten(self, n: Node) -> None:
        src = self.src(n.inputs[0])
        self.produced[n.name] = self.buffer(n.name, n.shape, src.scale, alias=src.name)

    def _hardswish(self, n: Node) -> None:
        src = self.src(n.inputs[0])
        t, lo, hi = self.target(n)
        out = self.buffer(t.name, t.shape, float(n.module.scale_out))
        table = n.module.table.numpy().astype(np.int8)
        if lo == 0:
            table = np.maximum(table, 0).astype(np.int8)
        self.emit(n, Op("lut", n.path, [src.name], out, lo, hi, {}, {"table": table}), t)


def lower(g: Graph) -> IntGraph:
    return _Lowering(g).run()
