"""The NumPy reference of the integer graph: the arithmetic the generated C performs, on a batch.

It is the specification the C code is tested against bit for bit; both use only integer operations,
with the requantization of :mod:`prunekit.quant.rounding` (the rule the PyTorch int8 model follows).
"""

from __future__ import annotations

import numpy as np

from prunekit.export.c.ir import IntGraph, Op
from prunekit.quant.rounding import requantize_np as requantize
from prunekit.quant.rounding import rshift_round


def _conv(x: np.ndarray, op: Op) -> np.ndarray:
    p = op.params
    n = x.shape[0]
    x = x.reshape(n, p["cin"], p["h"], p["w"]).astype(np.int64)
    g, kh, kw = p["groups"], p["kh"], p["kw"]
    cpg, opg = p["cin"] // g, p["cout"] // g
    # products summed in float64 (BLAS): exact, every partial sum is an integer below 2**53
    weight = op.arrays["weight"].astype(np.float64).reshape(p["cout"], cpg, kh, kw)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p["py"], p["py"]), (p["px"], p["px"])))
    acc = np.zeros((n, p["cout"], p["oh"], p["ow"]), dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * p["dy"], kx * p["dx"]
            win = xp[
                :,
                :,
                y0 : y0 + p["sy"] * (p["oh"] - 1) + 1 : p["sy"],
                x0 : x0 + p["sx"] * (p["ow"] - 1) + 1 : p["sx"],
            ]
            for gi in range(g):
                wk = weight[gi * opg : (gi + 1) * opg, :, ky, kx]  # (opg, cpg)
                part = np.tensordot(wk, win[:, gi * cpg : (gi + 1) * cpg], axes=([1], [1]))  # o, n, h, w
                acc[:, gi * opg : (gi + 1) * opg] += np.rint(part.transpose(1, 0, 2, 3)).astype(np.int64)
    shape = (1, -1, 1, 1)
    a = op.arrays
    # acc * M + bias with bias = bias_q * M: the layer's (acc + bias_q) * M
    y = acc * a["mult"].reshape(shape).astype(np.int64) + a["bias"].reshape(shape)
    y = np.clip(rshift_round(y, a["shift"].reshape(shape).astype(np.int64)), op.lo, op.hi)
    return y.reshape(n, -1)


def _pool(x: np.ndarray, op: Op) -> np.ndarray:
    p = op.params
    n = x.shape[0]
    x = x.reshape(n, p["c"], p["h"], p["w"]).astype(np.int64)
    avg = op.kind == "avgpool"
    fill = 0 if avg else -(2**40)  # padding: zeros count in an average, never win a maximum
    xp = np.pad(x, ((0, 0), (0, 0), (p["py"], p["py"]), (p["px"], p["px"])), constant_values=fill)
    out = (
        np.zeros((n, p["c"], p["oh"], p["ow"]), dtype=np.int64)
        if avg
        else np.full((n, p["c"], p["oh"], p["ow"]), fill)
    )
    for ky in range(p["kh"]):
        for kx in range(p["kw"]):
            win = xp[
                :,
                :,
                ky : ky + p["sy"] * (p["oh"] - 1) + 1 : p["sy"],
                kx : kx + p["sx"] * (p["ow"] - 1) + 1 : p["sx"],
            ]
            out = out + win if avg else np.maximum(out, win)
    return requantize(out, op.params["m"], op.params["shift"], op.lo, op.hi).reshape(n, -1)


def run_op(op: Op, args: list[np.ndarray]) -> np.ndarray:
    p = op.params
    if op.kind == "conv":
        return _conv(args[0], op)
    if op.kind == "add":
        y = args[0].astype(np.int64) * p["ma"] + args[1].astype(np.int64) * p["mb"]
        return np.clip(rshift_round(y, np.int64(p["shift"])), op.lo, op.hi)
    if op.kind == "requant":
        return requantize(args[0], p["m"], p["shift"], op.lo, op.hi)
    if op.kind == "lut":
        return op.arrays["table"][args[0].astype(np.int64) + 128].astype(np.int64)
    if op.kind in ("maxpool", "avgpool"):
        return _pool(args[0], op)
    if op.kind == "widen":
        return args[0].astype(np.int64) * 65536
    raise ValueError(f"unknown op kind {op.kind!r}")


def run(g: IntGraph, x: np.ndarray) -> np.ndarray:
    """Run the integer graph on int8 inputs ``x`` (N, input elements); returns the int32 output (N, out)."""
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise ValueError(f"reference.run takes int8 inputs, got {x.dtype}")
    values = {g.input: x.reshape(x.shape[0], -1).astype(np.int64)}
    for op in g.ops:
        out = run_op(op, [values[g.root(i)] for i in op.inputs])
        values[g.root(op.output)] = out.reshape(x.shape[0], -1)
    return values[g.root(g.output)].astype(np.int32)
