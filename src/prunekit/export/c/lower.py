"""Lower a captured graph to the integer graph: choose every tensor's scale, fuse ReLU/ReLU6 into the
operator before them, and turn float scales into fixed-point multipliers.

Scales mirror the PyTorch int8 model wherever it quantizes: a tensor read by an int8 layer gets that
layer's ``act_scale`` (so the int8 values the layer sees are the ones PyTorch computes), and the scale
moves back through ReLU, ReLU6, max pooling and flatten, which commute with a positive scale and with
rounding (a value they clip or drop cannot reach their output). Any other tensor (a residual branch
before the add, the input of global average pooling, the logits) gets ``max|x| / 127`` over the
calibration inputs, the rule of :func:`prunekit.quant.layers.activation_scale`.

A final int8 layer writes int32 logits at ``scale / 65536``; any other final operator is widened to
that form, so the C API always has one int32 output.
"""

from __future__ import annotations

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.export.c.fixedpoint import multiplier
from prunekit.export.c.graph import Graph, Node
from prunekit.export.c.ir import INT8_HI, INT8_LO, INT32_HI, INT32_LO, WIDE, Buffer, IntGraph, Op
from prunekit.quant.rounding import activation_scale

TRANSPARENT = ("relu", "relu6", "maxpool", "flatten")
FUSABLE = ("conv", "add", "lut", "maxpool", "avgpool", "gap", "requant")


def calibrated(top: float) -> float:
    return float(activation_scale(torch.tensor(top, dtype=torch.float32)))


def assign_scales(g: Graph) -> dict[str, float]:
    users = g.users()
    scale: dict[str, float] = {}
    for n in reversed(g.nodes):
        us = users[n.name]
        ints = [u for u in us if u.kind == "conv"]
        if ints:
            scale[n.name] = ints[0].attrs["act_scale"]
        elif (
            us
            and n.name != g.output
            and all(u.kind in TRANSPARENT for u in us)
            and len({scale[u.name] for u in us}) == 1
        ):
            scale[n.name] = scale[us[0].name]
        else:
            scale[n.name] = calibrated(n.top)
    return scale


def _relu6_hi(s: float) -> int:
    return int(min(INT8_HI, np.round(np.float32(6.0) / np.float32(s))))


class _Lowering:
    def __init__(self, g: Graph) -> None:
        self.g, self.users, self.scale = g, g.users(), assign_scales(g)
        self.buffers: dict[str, Buffer] = {}
        self.ops: list[Op] = []
        self.produced: dict[str, str] = {}
        self.fused: set[str] = set()
        self.pending: dict[str, Node] = {}  # add -> the conv whose sole reader it is (fused residual)

    def buffer(self, name: str, shape: tuple[int, ...], scale: float, **kw) -> str:
        self.buffers[name] = Buffer(name, tuple(int(d) for d in shape), float(scale), **kw)
        return name

    def target(self, n: Node) -> tuple[Node, int, int]:
        """The node whose value ``n``'s operator writes (its sole ReLU/ReLU6 user, fused) and the clamp."""
        us = self.users[n.name]
        if n.name != self.g.output and len(us) == 1 and us[0].kind in ("relu", "relu6"):
            u = us[0]
            if u.name != self.g.output:
                self.fused.add(u.name)
                return u, 0, INT8_HI if u.kind == "relu" else _relu6_hi(self.scale[u.name])
        return n, INT8_LO, INT8_HI

    def src(self, name: str) -> Buffer:
        return self.buffers[self.produced[name]]

    def emit(self, n: Node, op: Op, t: Node) -> None:
        self.ops.append(op)
        self.produced[n.name] = self.produced[t.name] = op.output

    def requant_op(self, n: Node, src: Buffer, m: float, out: str, lo: int, hi: int, kind="requant") -> Op:
        big, sh, _ = multiplier(m)
        return Op(kind, n.path, [src.name], out, lo, hi, {"m": big, "shift": sh})

    def run(self) -> IntGraph:
        g = self.g
        first = g.nodes[0]
        self.produced[first.name] = self.buffer("input", first.shape, self.scale[first.name], external=True)
        for n in g.nodes[1:]:
            if n.name in self.fused:
                continue
            getattr(self, f"_{n.kind}")(n)
        if self.produced[g.output] != "output":  # a final operator other than an int8 layer
            src = self.src(g.output)
            self.buffer("output", src.shape, src.scale / WIDE, wide=True)
            self.ops.append(Op("widen", "output", [src.name], "output", INT32_LO, INT32_HI))
        return IntGraph(self.buffers, self.ops, "input", "output")

    # -- operators -------------------------------------------------------------------------------------
    def _conv(self, n: Node) -> None:
        us = self.users[n.name]
        if (
            n.name != self.g.output
            and len(us) == 1
            and us[0].kind == "add"
            and us[0].name not in self.pending
        ):
            self.pending[us[0].name] = n  # emitted by the add, with the other operand as its residual
            return
        self._emit_conv(n, None)

    def _emit_conv(self, n: Node, residual: tuple[Node, Buffer] | None) -> None:
        a = n.attrs
        src = self.src(n.inputs[0])
        linear = len(n.shape) == 1
        if linear != (len(src.shape) == 1):
            raise PrunekitError(
                f"layer '{n.path}': a Linear needs a flat (N, features) input here (flatten first), "
                f"a Conv2d an (N, C, H, W) one; got input shape {src.shape}"
            )
        if src.scale != a["act_scale"]:  # another reader fixed this tensor's scale first
            name = self.buffer(f"{n.name}_input", src.shape, a["act_scale"])
            self.ops.append(self.requant_op(n, src, src.scale / a["act_scale"], name, INT8_LO, INT8_HI))
            src = self.buffers[name]
        cin, h, w = (src.shape[0], 1, 1) if linear else src.shape
        cout, oh, ow = (n.shape[0], 1, 1) if linear else n.shape
        wide = n.name == self.g.output
        node = n if residual is None else residual[0]  # the add, when the residual is fused
        t, lo, hi = (n, INT32_LO, INT32_HI) if wide else self.target(node)
        s_out = self.scale[t.name] / (WIDE if wide else 1)
        out = self.buffer("output" if wide else t.name, t.shape, s_out, wide=wide)
        prod = (np.float32(a["act_scale"]) * a["weight_scale"]).astype(np.float64)  # float32, as torch
        bias = np.zeros(cout) if a["bias"] is None else a["bias"].astype(np.float64)
        ratio = 0.0 if residual is None else residual[1].scale / s_out
        consts = [multiplier(float(p) / s_out, float(b) / s_out, 127 * ratio) for p, b in zip(prod, bias)]
        kh, kw = a["kernel"]
        params = dict(cin=cin, h=h, w=w, cout=cout, oh=oh, ow=ow, kh=kh, kw=kw, groups=a["groups"])
        params.update(sy=a["stride"][0], sx=a["stride"][1], py=a["padding"][0], px=a["padding"][1])
        params.update(dy=a["dilation"][0], dx=a["dilation"][1], linear=linear)
        arrays = {
            "weight": a["weight"],
            "mult": np.array([c[0] for c in consts], dtype=np.int32),
            "shift": np.array([c[1] for c in consts], dtype=np.int8),
            "bias": np.array([c[2] for c in consts], dtype=np.int64),
        }
        inputs = [src.name]
        if (
            residual is not None
        ):  # out = requant(acc * M + B + r * R): the add without rounding the conv first
            if residual[1].shape != t.shape and residual[1].numel != self.buffers[out].numel:
                raise PrunekitError(f"add at '{node.path}': shapes {residual[1].shape} and {t.shape} differ")
            arrays["res_mult"] = np.array([round(ratio * 2.0 ** int(c[1])) for c in consts], dtype=np.int64)
            inputs.append(residual[1].name)
        op = Op(
            "conv",
            n.path,
            inputs,
            out,
            lo,
            hi,
            params,
            arrays,
        )
        self.ops.append(op)
        self.produced[n.name] = self.produced[node.name] = self.produced[t.name] = out

    def _add(self, n: Node) -> None:
        conv = self.pending.pop(n.name, None)
        if conv is not None:
            other = n.inputs[1] if n.inputs[0] == conv.name else n.inputs[0]
            self._emit_conv(conv, (n, self.src(other)))
            return
        a, b = (self.src(i) for i in n.inputs)
        t, lo, hi = self.target(n)
        s_out = self.scale[t.name]
        out = self.buffer(t.name, t.shape, s_out)
        ma, mb = a.scale / s_out, b.scale / s_out
        _, sh, _ = multiplier(max(ma, mb))
        params = {
            "ma": min(round(ma * 2.0**sh), 2**31 - 1),
            "mb": min(round(mb * 2.0**sh), 2**31 - 1),
            "shift": sh,
        }
        if a.shape != b.shape:
            raise PrunekitError(f"add at '{n.path}': shapes {a.shape} and {b.shape} differ (no broadcasting)")
        self.emit(n, Op("add", n.path, [a.name, b.name], out, lo, hi, params), t)

    def _unary(self, n: Node, m_extra: float, kind: str, params: dict | None = None) -> None:
        src = self.src(n.inputs[0])
        t, lo, hi = self.target(n) if n.kind not in ("relu", "relu6") else (n, 0, INT8_HI)
        if n.kind == "relu6":
            hi = _relu6_hi(self.scale[n.name])
        out = self.buffer(t.name, t.shape, self.scale[t.name])
        op = self.requant_op(n, src, src.scale / (self.scale[t.name] * m_extra), out, lo, hi, kind)
        op.params.update(params or {})
        self.emit(n, op, t)

    def _relu(self, n: Node) -> None:
        self._unary(n, 1.0, "requant")

    _relu6 = _relu

    def _pool_params(self, n: Node) -> dict:
        src = self.src(n.inputs[0])
        c, h, w = src.shape
        if n.kind == "gap":
            return dict(c=c, h=h, w=w, oh=1, ow=1, kh=h, kw=w, sy=1, sx=1, py=0, px=0)
        _, oh, ow = n.shape
        a = n.attrs
        return dict(
            c=c, h=h, w=w, oh=oh, ow=ow, kh=a["kernel"][0], kw=a["kernel"][1],
            sy=a["stride"][0], sx=a["stride"][1], py=a["padding"][0], px=a["padding"][1],
        )  # fmt: skip

    def _maxpool(self, n: Node) -> None:
        self._unary(n, 1.0, "maxpool", self._pool_params(n))

    def _avgpool(self, n: Node) -> None:
        p = self._pool_params(n)
        self._unary(n, float(p["kh"] * p["kw"]), "avgpool", p)

    def _gap(self, n: Node) -> None:
        if len(self.src(n.inputs[0]).shape) != 3:
            raise PrunekitError(f"global average pooling at '{n.path}' needs an (N, C, H, W) input")
        p = self._pool_params(n)
        self._unary(n, float(p["h"] * p["w"]), "avgpool", p)

    def _flatten(self, n: Node) -> None:
        src = self.src(n.inputs[0])
        if src.scale == self.scale[n.name] and not src.wide:
            self.produced[n.name] = self.buffer(n.name, n.shape, src.scale, alias=src.name)
        else:
            self._unary(n, 1.0, "requant")

    def _hardswish(self, n: Node) -> None:
        src = self.src(n.inputs[0])
        t, lo, hi = self.target(n)
        s_out = self.scale[t.name]
        q = np.arange(-128, 128, dtype=np.float32)
        v = q * np.float32(src.scale)
        hs = v * np.clip(v + np.float32(3), 0, 6).astype(np.float32) / np.float32(6)
        table = np.clip(np.round(hs / np.float32(s_out)), lo, hi).astype(np.int8)
        out = self.buffer(t.name, t.shape, s_out)
        self.emit(n, Op("lut", n.path, [src.name], out, lo, hi, {}, {"table": table}), t)


def lower(g: Graph) -> IntGraph:
    return _Lowering(g).run()
