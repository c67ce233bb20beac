"""Whole-network compilation of CNNs: convolutions chained in the aligned-plane layout, batch 1.

Entering and leaving the kernels' layout costs about as much as a sparse layer at 224x224 (50-300 us per
conversion), so :func:`build` lowers a whole ``torch.fx`` graph instead of single modules:

* every supported convolution (``nn.Conv2d``, or prunekit's ``QuantizedConv2d`` with a static activation
  scale) becomes a :class:`ConvStep` that absorbs what follows it while nobody else reads the intermediate
  value: a BatchNorm (folded into the float32 weights; prunekit's int8 convolutions come folded), a
  ReLU / ReLU6 (a clamp), one residual add (a float ``+``, or an integer model's ``QuantizedAdd``; the
  other operand read from its planes) and a ReLU after it. int8 epilogues compute the layer's output form
  (an integer model's fixed-point requantization, ``prunekit.quant.rounding``), in integers where that is
  exact (the integer chain, ``conv.chain_reason``: residuals then read as bytes, and a value whose bytes
  are its integers needs no float32 planes at all: a torch step gets ``float32(q) * s`` from them).
  Its epilogue writes its output straight into the planes its consumers read (column-shifted copies
  for the stride-1 convolutions after it; int8: the bytes the next layer reads, quantized with that
  layer's scale, and float32 where a torch step or an exit needs the float value, as
  ``prunekit.quant.layers`` defines it);
* ``nn.MaxPool2d`` runs in the layout (:class:`PoolStep`), an integer model's global average pool on
  the bytes (:class:`GlobalPoolStep`); an input quantizer whose readers all round at its scale is left to
  them;
* anything else runs in torch on NCHW tensors (:class:`TorchStep`); values cross between the two worlds
  through conversions that are built once and counted in the timings.

Strided convolutions read a gather made for them from the producer's planes (the stride's phases and
column picks); stride-1 convolutions read the producer's planes directly. Each convolution's tile is
picked by timing on the real input, as :func:`prunekit.runtime.compile` does for single layers, and a
float32 convolution may stay dense (torch on NCHW, plus the conversions) where that measures faster.
"""

from __future__ import annotations

import logging
import operator
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from prunekit.errors import PrunekitError
from prunekit.quant.fold import fold_conv_bn
from prunekit.quant.glue import QuantizedAdd, QuantizedGlobalAvgPool, QuantizeInput
from prunekit.quant.graph import Tracer
from prunekit.quant.layers import QuantizedConv2d
from prunekit.runtime import conv_layout as L
from prunekit.runtime import threads
from prunekit.runtime.conv import (
    NO_CLAMP,
    ConvGeom,
    DirectConvF32,
    DirectConvI8,
    Int8Out,
    IntAdd,
    Requant,
    block_alive,
    chain_reason,
    final_scale,
    group_union,
    host_width,
    isa_name,
    tile_options,
    unpack_bytes,
    unsupported,
)
from prunekit.runtime.conv_kernels import SHARED_NV
from prunekit.runtime.gemv import GemvLinear

log = logging.getLogger(__name__)

_ADDS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCS = {F.relu: (0.0, np.inf), torch.relu: (0.0, np.inf), F.relu6: (0.0, 6.0)}
_RELU_METHODS = {"relu": (0.0, np.inf), "relu_": (0.0, np.inf)}
CHANNEL_BLOCKS = (8, 16, 32, None)  # input channels per block tried by the timing (None: all)
SHARED_UNION_MAX = 1.5  # offer the shared-load int8 kernel up to this many dot products per useful one


def _clamp_of(node: fx.Node, gm: fx.GraphModule) -> tuple[float, float] | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.ReLU:
            return (0.0, np.inf)
        if type(mod) is nn.ReLU6:
            return (0.0, 6.0)
    if node.op == "call_function" and node.target in _RELU_FUNCS and not node.kwargs:
        return _RELU_FUNCS[node.target]
    if node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1:
        return _RELU_METHODS[node.target]
    return None


def _is_identity(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Dropout))


def _add_operands(node: fx.Node, gm: fx.GraphModule) -> tuple | None:
    if node.kwargs or len(node.args) != 2:
        return None
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is QuantizedAdd:
        return node.args
    if (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    ):
        return node.args
    return None


def _bn(node: fx.Node, gm: fx.GraphModule) -> nn.BatchNorm2d | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    ok = type(mod) is nn.BatchNorm2d and mod.track_running_stats and mod.running_mean is not None
    return mod if ok else None


def _depends_on(node: fx.Node, targets: set, memo: dict) -> bool:
    """Whether ``node`` is computed from any of ``targets``."""
    if node in targets:
        return True
    if node not in memo:
        memo[node] = False
        memo[node] = any(_depends_on(a, targets, memo) for a in node.all_input_nodes)
    return memo[node]


def _global_pool(node: fx.Node, gm: fx.GraphModule) -> QuantizedGlobalAvgPool | None:
    if (
        node.op != "call_module"
        or len(node.args) != 1
        or node.kwargs
        or not isinstance(node.args[0], fx.Node)
    ):
        return None
    mod = gm.get_submodule(node.target)
    return mod if type(mod) is QuantizedGlobalAvgPool else None


def _requantized_by_readers(node: fx.Node, gm: fx.GraphModule) -> bool:
    """An input quantizer (``QuantizeInput``, ``float32(clamp(round(x / s))) * s``) whose every reader is an
    int8 convolution that rounds its input at the same static scale: the reader computes the same integers
    from ``x`` itself (``round(float32(q) * s / s) == q``): the quantizer's pass over the image is saved."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not node.users:
        return False
    if type(gm.get_submodule(node.target)) is not QuantizeInput:
        return False
    scale = np.float32(gm.get_submodule(node.target).scale.item())
    for user in node.users:
        mod = gm.get_submodule(user.target) if user.op == "call_module" else None
        if not isinstance(mod, QuantizedConv2d) or mod.act_scale is None or user.args != (node,):
            return False
        if np.float32(mod.act_scale.item()) != scale:
            return False
    return True


def _batch1_image(t) -> bool:
    return isinstance(t, Tensor) and t.dim() == 4 and t.shape[0] == 1 and t.dtype == torch.float32


@dataclass
class Value:
    """One fx node's tensor in the segment: NCHW in torch, and/or in planes (float32 / int8 bytes)."""

    node: fx.Node
    shape: tuple[int, int, int]
    producer: object = None  # the Step that writes its planes (None: it is born NCHW)
    pitch: int | None = None
    top: int = 1
    bottom: int = 1
    shifts: set = field(default_factory=lambda: {0})
    needs_float: bool = False  # int8: someone reads the float32 value from planes
    byte_scale: float | None = None  # int8: the scale of the bytes the producer writes (None: no bytes)
    offset: int = 0
    floats: L.Layout | None = None
    fbuf: np.ndarray | None = None
    bytes_: L.Layout | None = None
    bbuf: np.ndarray | None = None

    def layout(self, units: int) -> L.Layout:
        c, h, w = self.shape
        return L.planes(units, h, w, self.top, self.bottom, self.shifts, pitch=self.pitch)


class Env:
    """One forward pass: NCHW tensors by node, converted from planes on demand."""

    def __init__(self) -> None:
        self.nchw: dict[fx.Node, Tensor] = {}
        self.gathered: set[int] = set()  # the gather buffers filled in this pass (convolutions share some)

    def tensor(self, v: Value) -> Tensor:
        found = self.nchw.get(v.node)
        if found is None:
            if v.fbuf is not None:
                found = torch.from_numpy(L.read_nchw(v.fbuf, v.floats, v.shape[0]))
            else:  # exact bytes (integer chain): the value is float32(q) * s, as prunekit.quant.glue has it
                found = bytes_nchw(v).to(torch.float32) * torch.tensor(v.byte_scale, dtype=torch.float32)
            self.nchw[v.node] = found
        return found


def bytes_nchw(v: Value) -> Tensor:
    """A value's int8 integers (1, C, H, W) from its byte planes."""
    c, h, w = v.shape
    lay = v.bytes_
    units = np.empty(lay.units * h * w, np.int32)
    L.read(v.bbuf, lay.col0(), lay.per_unit * lay.plane, lay.pitch, lay.units, h, w, units)
    return torch.from_numpy(unpack_bytes(units, c, h, w, v.offset))[None]


def exact_bytes(v: Value) -> bool:
    """Whether ``v``'s bytes are exactly its integers at its own scale (an integer-chain convolution's
    output, or a max pool of one), so its float32 value is ``float32(q) * byte_scale`` and needs no planes."""
    step = v.producer
    if isinstance(step, PoolStep):
        return v.byte_scale is not None and exact_bytes(step.inp) and step.inp.byte_scale == v.byte_scale
    if isinstance(step, ConvStep) and step.chain and v.byte_scale is not None:
        return np.float32(v.byte_scale) == np.float32(final_scale(step.requant, step.add))
    return False


def _fill_from(v: Value, env: Env, dst: np.ndarray, lay: L.Layout, geo: np.ndarray) -> None:
    """Float32 ``v`` into the layout ``lay`` (a gather or planes), from its planes if it has them."""
    c, h, w = v.shape
    if v.fbuf is not None and v.node not in env.nchw:
        src = v.floats
        threads.call(L.fill, v.fbuf, src.col0(), src.per_unit * src.plane, src.pitch, h, w, c, dst, geo,
                     np.int32(0))  # fmt: skip
    else:
        a = env.tensor(v).contiguous().numpy().reshape(-1).view(np.int32)
        threads.call(L.fill, a, 0, h * w, w, h, w, c, dst, geo, np.int32(0))


def nonneg(v: Value) -> bool:
    """Whether a value is >= 0 by construction (after a ReLU), so its int8 bytes need no +128 offset."""
    step = v.producer
    if isinstance(step, ConvStep):
        return step.clamp[0] >= 0
    if isinstance(step, PoolStep):
        return nonneg(step.inp)
    return False


def write_planes(v: Value, y: Tensor) -> None:
    """An NCHW result into the value's planes (float32 and/or bytes), as a kernel epilogue would."""
    c, h, w = v.shape
    a = y.detach().to(torch.float32).contiguous().numpy().reshape(-1)
    if v.fbuf is not None:
        L.fill(a.view(np.int32), 0, h * w, w, h, w, c, v.fbuf, L.fill_geo(v.floats), np.int32(0))
    if v.bbuf is not None:
        packed = np.empty(-(-c // 4) * h * w, np.int32)
        L.quantize_pack(a, c, h * w, np.float32(v.byte_scale), v.offset, packed)
        zero = L.ZERO_OFFSET if v.offset else np.int32(0)
        L.fill(packed, 0, h * w, w, h, w, -(-c // 4), v.bbuf, L.fill_geo(v.bytes_), zero)


class ConvStep:
    """One convolution with its fused BatchNorm / clamp / residual (module docstring)."""

    def __init__(self, name: str, module: nn.Module, nodes: list, inp: Value, out: Value, *, weight: Tensor,
                 bias: Tensor | None, clamp, residual: Value | None,
                 add: IntAdd | None = None) -> None:  # fmt: skip
        self.name, self.module, self.nodes = name, module, nodes
        self.add = add  # a fused integer add (QuantizedAdd) of the output and the residual
        self.inp, self.out, self.residual = inp, out, residual
        self.geom = ConvGeom.of(module)
        self.int8 = isinstance(module, QuantizedConv2d)
        self.weight, self.bias, self.clamp = weight, bias, clamp
        self.direct = False  # reads the producer's planes, no gather
        self.tight = False  # rows a multiple of 4 positions, not 8 (conv_layout.pitch_for; the layout plan)
        self.kernel: Callable | None = None
        self.choice = "dense"
        self.timings: dict[str, float] = {}
        self.reason = ""
        self.chain = False  # the integer epilogue (conv.chain_reason), decided by the layout plan
        # the integer output form (prunekit.quant.graph's integer models): the fixed-point requantization
        self.requant = Requant.of(module) if self.int8 else None

    @property
    def sparsity(self) -> float:
        w = self.weight
        return 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)

    @property
    def out_pitch(self) -> int:
        return self.inp.pitch if self.direct else L.pitch_for(self.out_hw[1], self.tight)

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.out.shape[1], self.out.shape[2]

    # -- set up, once the layouts are known ---------------------------------------------------------------
    def prepare(self, vw: int, isa: str, earlier: list = ()) -> None:
        """Buffers and layouts once the plan is made (``earlier``: the convolutions before this one, whose
        gathers it may share)."""
        g, (c, h, w) = self.geom, self.inp.shape
        self.vw, self.isa = vw, isa
        self.act_scale = np.float32(self.module.act_scale.item()) if self.int8 else None
        if self.int8:
            units = -(-c // 4)
            self.src_bytes = self.inp.bbuf is not None and self.inp.byte_scale == float(self.act_scale)
            self.in_offset = self.inp.offset if self.src_bytes else (0 if nonneg(self.inp) else 128)
        else:
            units, self.src_bytes, self.in_offset = c, False, 0
        if self.direct:
            self.in_layout = self.inp.bytes_ if self.int8 else self.inp.floats
        elif (other := self._gather_to_share(earlier)) is not None:  # whichever runs first fills it
            self.in_layout, self.gbuf, self.ggeo = other.in_layout, other.gbuf, other.ggeo
            self.packed = getattr(other, "packed", None)
        else:
            self.in_layout = L.gather(units, h, w, *g.args, pitch=self.out_pitch)
            self.gbuf = self.in_layout.alloc(L.ZERO_OFFSET if self.in_offset else 0)
            self.ggeo = L.fill_geo(self.in_layout)
            if self.int8 and not self.src_bytes:
                self.packed = np.empty(units * h * w, np.int32)
        r = self.residual
        self.rlayout = None
        if r is not None:
            if self.chain:  # the residual's bytes (the plan checked their pitch and scale)
                self.rlayout, self.abuf = r.bytes_, None
            elif r.floats is not None and r.floats.pitch == self.out_pitch and r.producer is not None:
                self.rlayout, self.abuf = r.floats, None
            else:  # an adapter: the residual copied into planes of this output's pitch
                units = L.roundup(r.shape[0], 4)  # int8 epilogues read 4 channels at a time
                self.rlayout = L.planes(units, r.shape[1], r.shape[2], 1, 1, (), pitch=self.out_pitch)
                self.abuf, self.ageo = self.rlayout.alloc(), L.fill_geo(self.rlayout)
        w_np = self.weight.detach().numpy()
        if self.int8:
            self.wq = w_np
            self.scale = (
                self.act_scale * self.module.weight_scale.detach().to(torch.float32).numpy()
            ).astype(np.float32)
            self.dense_w = torch.from_numpy(w_np.astype(np.float32))
        else:
            self.w32 = np.ascontiguousarray(w_np, dtype=np.float32)
        self.b_np = None if self.bias is None else self.bias.detach().to(torch.float32).numpy().copy()
        self.finisher = self._finisher() if self.int8 else None

    @property
    def engine(self) -> str:
        if self.kernel is None:
            return "torch f32 on int8 values (exact)" if self.int8 else "torch"
        if self.int8:
            lanes = "channel lanes" if getattr(self.kernel, "channels", None) is not None else "4x1"
            return f"prunekit int8 {lanes} ({self.isa})"
        return f"prunekit planes f32 ({self.vw * 32}-bit)"

    def describe(self) -> str:
        """What the step fused and how it reads its input, for the report."""
        parts = []
        if len(self.nodes) > 1:
            parts.append("fused " + "+".join(n.name for n in self.nodes[1:]))
        if self.chain:
            parts.append("integer epilogue")
        parts.append("reads the producer's planes" if self.direct else "gathers its input")
        if self.reason:
            parts.append(self.reason)
        return "; ".join(parts)

    def usable(self) -> str | None:
        """Why the sparse kernel cannot run this step (None: it can)."""
        if self.int8 and self.in_offset and self.isa != "vnni512":
            return "signed int8 input on AVX2 (vpmaddubsw would saturate with +128-offset bytes)"
        return None

    def _finisher(self):
        """An epilogue-only twin of the int8 kernel (the exact dense path feeds it whole accumulators)."""
        out = self.out
        dest = Int8Out(
            layout=out.bytes_, s_next=out.byte_scale or 1.0, qlo=-127.0, offset=out.offset, floats=out.floats
        )
        vw = 16 if self.isa == "vnni512" else 8
        return DirectConvI8(
            self.wq,
            self.scale,
            self.b_np,
            self.geom,
            self.in_layout,
            dest,
            nv=min(tile_options(vw)),
            isa=self.isa,
            clamp=self.clamp,
            residual=self.rlayout,
            requant=self.requant,
            add=self.add,
            chain=self.chain,
            residual_offset=self.residual.offset if self.chain and self.residual is not None else 0,
        )

    def make_kernel(self, nv: int, cb: int | None, shared: bool = False, channels: bool = False):
        out = self.out
        if not self.int8:
            return DirectConvF32(
                self.w32,
                self.b_np,
                self.geom,
                self.in_layout,
                out.floats,
                nv=nv,
                vw=self.vw,
                cb=cb,
                clamp=self.clamp,
                residual=self.rlayout,
            )
        dest = Int8Out(
            layout=out.bytes_, s_next=out.byte_scale or 1.0, qlo=-127.0, offset=out.offset, floats=out.floats
        )
        return DirectConvI8(
            self.wq,
            self.scale,
            self.b_np,
            self.geom,
            self.in_layout,
            dest,
            nv=nv,
            isa=self.isa,
            cbg=None if cb is None else max(1, cb // 4),
            offset=self.in_offset,
            clamp=self.clamp,
            residual=self.rlayout,
            requant=self.requant,
            add=self.add,
            chain=self.chain,
            residual_offset=self.residual.offset if self.chain and self.residual is not None else 0,
            shared=shared,
            channels=channels,
        )

    def configs(self) -> list[tuple]:
        """``(nv, cb)`` tiles and channel blocks to time; int8 on VNNI also ``(nv, cb, True)``, the
        shared-load kernel, where a group of 4 output channels shares most of its blocks (dense and
        channel-pruned layers: each activation load then serves 4 channels; a random 4x1 pattern would pay
        2-3x the dot products for its union, so it is not offered there), and there ``(nv, None, False,
        True)``: output channels in the lanes (:mod:`prunekit.runtime.conv_channels`; small maps, whose
        positions fill few lanes)."""
        vw = self.vw if not self.int8 else (16 if self.isa == "vnni512" else 8)
        span = (self.out_hw[0] - 1) * self.out_pitch + self.out_hw[1]
        tiles = [nv for nv in tile_options(vw) if nv * vw <= max(span, min(tile_options(vw)) * vw)]
        blocks = [cb for cb in CHANNEL_BLOCKS if cb is None or cb < self.geom.cin]
        found: list[tuple] = [(nv, cb) for nv in tiles for cb in blocks]
        if self.int8 and self.isa == "vnni512" and self._union_ratio() <= SHARED_UNION_MAX:
            found += [(nv, cb, True) for nv in SHARED_NV if nv in tiles for cb in blocks]
            found += [(nv, None, False, True) for nv in SHARED_NV if nv in tiles]
        return found

    def _union_ratio(self) -> float:
        """Dot products of the shared-load packing over the per-channel one: the 4x1 blocks alive in any of
        a group's 4 output channels, times 4, over those alive per channel."""
        alive = block_alive(self.wq)  # (cpad, in groups, kh, kw)
        per_row = int(alive.sum())
        union = int(group_union(alive).sum())
        return 4 * union / max(per_row, 1)

    # -- running ------------------------------------------------------------------------------------------
    def _gather_to_share(self, earlier: list) -> ConvStep | None:
        """An earlier convolution whose gather of the same input, filled the same way, holds every tap this
        one reads (``conv_layout.gather_serves``)."""
        fill = (self.int8, self.src_bytes, self.in_offset, self.act_scale)
        for other in earlier:
            if other.inp is not self.inp or other.direct:
                continue
            if (other.int8, other.src_bytes, other.in_offset, other.act_scale) != fill:
                continue
            if L.gather_serves(other.in_layout, *self.geom.args, self.out_hw[0], self.out_pitch):
                return other
        return None

    def _input(self, env: Env) -> np.ndarray:
        inp = self.inp
        if self.direct:
            return inp.bbuf if self.int8 else inp.fbuf
        if id(self.gbuf) in env.gathered:  # filled by a convolution that shares it
            return self.gbuf
        env.gathered.add(id(self.gbuf))
        c, h, w = inp.shape
        zero = L.ZERO_OFFSET if self.in_offset else np.int32(0)
        if not self.int8:
            _fill_from(inp, env, self.gbuf, self.in_layout, self.ggeo)
        elif self.src_bytes:
            src = inp.bytes_
            threads.call(L.fill, inp.bbuf, src.col0(), src.per_unit * src.plane, src.pitch, h, w, src.units,
                         self.gbuf, self.ggeo, zero)  # fmt: skip
        else:
            a = env.tensor(inp).contiguous().numpy().reshape(-1)
            threads.call(L.quantize_pack, a, c, h * w, self.act_scale, self.in_offset, self.packed)
            threads.call(L.fill, self.packed, 0, h * w, w, h, w, -(-c // 4), self.gbuf, self.ggeo, zero)
        return self.gbuf

    def _residual(self, env: Env) -> np.ndarray | None:
        r = self.residual
        if r is None:
            return None
        if self.chain:
            return r.bbuf
        if self.abuf is None:
            return r.fbuf
        _fill_from(r, env, self.abuf, self.rlayout, self.ageo)
        return self.abuf

    def run(self, env: Env) -> None:
        if self.kernel is None:
            self._dense(env)
            return
        x, r = self._input(env), self._residual(env)
        if self.int8:
            self.kernel(x, self.out.bbuf, r, F=self.out.fbuf)
        else:
            self.kernel(x, self.out.fbuf, r)

    def _dense(self, env: Env) -> None:
        """torch on NCHW: float32, the result written into this step's planes; int8, a float32 convolution
        of the integer values (exact below 2**24) and then the kernels' own epilogue
        (:meth:`DirectConvI8.finish`): one spelling of the requantization."""
        g = self.geom
        if self.int8:  # one recorded call (a replay runs it whole): its inputs are the pass's buffers
            src = self.inp.bbuf if self.src_bytes else env.tensor(self.inp).contiguous().numpy().reshape(-1)
            out = self.out
            threads.call(self._dense_int8, src, out.bbuf, self._residual(env), out.fbuf)
            return
        y = F.conv2d(env.tensor(self.inp), self.weight, self.bias, g.stride, g.padding, g.dilation)
        if self.residual is not None:
            y = y + env.tensor(self.residual)
        lo, hi = self.clamp
        if np.isfinite(lo) or np.isfinite(hi):
            y = y.clamp(
                min=None if not np.isfinite(lo) else float(lo), max=None if not np.isfinite(hi) else float(hi)
            )
        env.nchw[self.out.node] = y
        write_planes(self.out, y)

    def _dense_int8(self, src: np.ndarray, Y: np.ndarray, R: np.ndarray | None, fout: np.ndarray | None):
        """The int8 dense path on ``src`` (the producer's bytes, or the float32 input flat): a float32
        convolution of the integer values (exact below 2**24), then the kernels' own epilogue."""
        g = self.geom
        acc = F.conv2d(self._dense_q(src), self.dense_w, None, g.stride, g.padding, g.dilation)
        self.finisher.finish(acc[0].numpy().astype(np.int32), Y, R, fout)

    def _dense_q(self, src: np.ndarray) -> Tensor:
        """The integer input values as float32 NCHW: from the producer's bytes, or quantized here."""
        inp = self.inp
        c, h, w = inp.shape
        if self.src_bytes:
            lay = inp.bytes_
            units = np.empty(lay.units * h * w, np.int32)
            L.read(src, lay.col0(), lay.per_unit * lay.plane, lay.pitch, lay.units, h, w, units)
        else:
            units = np.empty(-(-c // 4) * h * w, np.int32)
            L.quantize_pack(src, c, h * w, self.act_scale, 0, units)
        offset = inp.offset if self.src_bytes else 0
        return torch.from_numpy(unpack_bytes(units, c, h, w, offset))[None]


class PoolStep:
    """``k x k`` max pool, stride ``s``, padding ``p``, planes to planes (float32 and/or int8 bytes: rounding
    is monotonic, so the max of the quantized values is the quantized max)."""

    def __init__(self, node: fx.Node, inp: Value, out: Value, k: int, s: int, p: int) -> None:
        self.node, self.inp, self.out, self.k, self.s, self.p = node, inp, out, k, s, p
        self.name = node.name

    def prepare(self) -> None:
        c, h, w = self.inp.shape
        _, ho, wo = self.out.shape
        self.rowmax = np.empty(4 * (2 * w + wo) + 64, np.float32)  # rows, column maxima, the output row
        signed = not (self.inp.offset or nonneg(self.inp))
        # comparisons: threads split the units above threads.MIN_PARALLEL_WORK
        self.work = c * h * w * self.k * self.k
        self.scratch: dict[tuple, list[np.ndarray]] = {}
        # per element width (1: float32, 4: bytes) the output planes' offsets and shifts, made once (~30 us
        # a call)
        self.plans = {
            epu: (L.store_plan(lay, 1, 1)[0], np.array(lay.cols, np.int64))
            for epu, lay in ((1, self.out.floats), (4, self.out.bytes_))
            if lay is not None
        }
        src = self.inp.bytes_
        # non-negative bytes: the zero padding never wins, so whole rows are pooled (maxpool_bytes_3x3)
        self.zero_padded = (
            self.out.bbuf is not None and src is not None and not signed and not self.inp.offset
            and (self.k, self.p) == (3, 1)
            and src.row_pad >= 1 and src.rows >= src.row_pad + h + 1
            and (ho - 1) * self.s <= h - 1 and (wo - 1) * self.s <= w - 1
        )  # fmt: skip
        if self.zero_padded:  # maxpool_bytes_3x3's scratch: one row of 64-bit pairs and the output words
            self.rowbytes = np.empty(src.pitch + wo // 2 + 8, np.uint64)
        else:
            self.rowbytes = np.empty(4 * (2 * w + wo) + 64, np.int8 if signed else np.uint8)

    def _pool(self, src: L.Layout, sbuf: np.ndarray, dst: L.Layout, dbuf: np.ndarray, epu: int, row) -> None:
        c, h, w = self.inp.shape
        _, ho, wo = self.out.shape
        yoffs, cols = self.plans[epu]
        fast = epu == 4 and self.zero_padded
        view = np.uint8 if fast else row.dtype
        head = (sbuf.view(view), src.col0(), src.per_unit * src.plane, src.pitch)
        if fast:
            kernel, tail = L.maxpool_bytes_3x3, (h, w, self.s, dbuf.view(view), yoffs, cols,
                                                 dst.per_unit * dst.plane, dst.pitch, ho, wo)  # fmt: skip
        else:
            kernel, tail = L.maxpool, (epu, h, w, self.k, self.s, self.p, dbuf.view(view), yoffs, cols,
                                       dst.per_unit * dst.plane, dst.pitch, ho, wo)  # fmt: skip
        cuts = threads.even_splits(src.units, threads.chunks(self.work), align=1)
        key = (row.dtype, len(cuts) - 1)  # one scratch row per thread, made once per thread count
        if key not in self.scratch:
            self.scratch[key] = [row] + [row.copy() for _ in cuts[2:]]
        scratch = self.scratch[key]
        threads.run(kernel, [(*head, cuts[i], cuts[i + 1], *tail, scratch[i]) for i in range(len(cuts) - 1)])

    def run(self, env: Env) -> None:
        if self.out.fbuf is not None:
            self._pool(self.inp.floats, self.inp.fbuf, self.out.floats, self.out.fbuf, 1, self.rowmax)
        if self.out.bbuf is not None:
            self._pool(self.inp.bytes_, self.inp.bbuf, self.out.bytes_, self.out.bbuf, 4, self.rowbytes)


class TorchStep:
    exact = False  # a subclass that runs on the layout's own kernels sets it (then run() runs it)
    tail: tuple = ()  # nodes after ``node`` that the step runs too

    def __init__(self, node: fx.Node) -> None:
        self.node = node
        self.name = node.name


class GlobalPoolStep(TorchStep):
    """prunekit's int8 global average pool (``QuantizedGlobalAvgPool``) read from its input's exact bytes
    (:func:`exact_bytes`) by one kernel (``conv_layout.global_pool_bytes``: each channel's integers summed,
    the module's requantization, ``float32(q) * scale_out``). Without exact bytes it runs the module in torch
    like any other step (a dozen small torch ops: 0.1-0.4 ms in a forward pass at 512 x 7 x 7)."""

    def __init__(self, node: fx.Node, inp: Value, module: nn.Module, tail: tuple = (), gm=None) -> None:
        super().__init__(node)
        self.inp, self.module, self.exact = inp, module, False
        # the flatten and the classifier right after the pool (:func:`_pool_tail`), run here: as steps of
        # their own they cost 2-3x their work in dispatch (their module is looked up in ``gm`` at run
        # time: compile swaps the classifier for its own kernel after the segments are built)
        self.tail, self.gm = tail, gm

    def prepare(self) -> None:
        c, h, w = self.inp.shape
        self.m, self.sh = self.module.multiplier(h * w)
        self.s_out = np.float32(self.module.scale_out.item())
        self.y = np.empty(c, np.float32)
        self.logits: np.ndarray | None = None  # the classifier's outputs (a GemvLinear head), reused

    def run(self, env: Env) -> None:
        v, (c, h, w) = self.inp, self.inp.shape
        lay = v.bytes_
        src = v.bbuf.view(np.uint8)
        threads.call(L.global_pool_bytes, src, lay.col0(), lay.per_unit * lay.plane, lay.pitch, c, h, w,
                     v.offset, self.m, self.sh, self.s_out, self.y)  # fmt: skip
        if self.tail:
            head = self.gm.get_submodule(self.tail[-1].target)
            if isinstance(head, GemvLinear):  # its kernel on the pooled vector (GemvLinear.forward's path)
                if self.logits is None or self.logits.size != head.packed.rows:
                    self.logits = np.empty(head.packed.rows, np.float32)
                head.gemv(self.y, out=self.logits)
                out = self.result(head.out_features)
            else:
                out = head(torch.from_numpy(self.y.copy()).reshape(1, c))
            env.nchw[self.tail[-1]] = out
            return
        y = torch.from_numpy(self.y.copy())
        env.nchw[self.node] = y.reshape(1, c, 1, 1) if self.module.keepdim else y.reshape(1, c)

    def result(self, n: int) -> Tensor:
        """The classifier's ``n`` outputs as a (1, n) tensor of their own (the buffer is reused)."""
        return torch.from_numpy(self.logits[:n].copy()).reshape(1, n)


def _pool_tail(node: fx.Node) -> tuple:
    """``(flatten, head)`` when a global pool's only reader is ``flatten(pool, 1)`` whose only reader is a
    module called on it alone (the classifier); else ``()``."""
    if len(node.users) != 1:
        return ()
    flat = next(iter(node.users))
    flattens = (flat.op == "call_function" and flat.target is torch.flatten) or (
        flat.op == "call_method" and flat.target == "flatten"
    )
    start = flat.args[1:]  # flatten(x, 1), or flatten(x, start_dim=1)
    if flat.kwargs:
        start = (flat.kwargs["start_dim"],) if set(flat.kwargs) == {"start_dim"} and not start else ()
    if not flattens or flat.args[:1] != (node,) or tuple(start) != (1,) or len(flat.users) != 1:
        return ()
    head = next(iter(flat.users))
    if head.op != "call_module" or head.args != (flat,) or head.kwargs:
        return ()
    return flat, head


def _record(gm: fx.GraphModule, example: Tensor) -> dict[fx.Node, object]:
    """Every node's output on ``example`` (one forward pass through an interpreter)."""
    seen: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            seen[n] = out.detach().clone() if isinstance(out, Tensor) else out
            return out

    with torch.inference_mode():
        Recorder(gm).run(example)
    return seen


def time_interleaved(
    fns: dict[str, Callable], rounds: int = 7, warmup: int = 1, calls: int = 1
) -> dict[str, float]:
    """Median microseconds per callable, all called per round in a shuffled order, each ``calls`` times in
    a row with the last call timed. prunekit's workers are sent to sleep before each (``threads.rest``): one
    left spinning by a segment's forward pass would share the second core with the next callable."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            threads.rest()
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                fns[k]()
                dt = time.perf_counter_ns() - t0
            samples[k].append(dt / 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


class Segmented(nn.Module):
    """A traced CNN run step by step: convolutions and max pools in the plane layout, the rest in torch.
    Inputs of another shape than the one it was built for run the original graph."""

    def __init__(
        self, gm: fx.GraphModule, steps: list, values: dict, shape: tuple, int8: bool, isa: str, vw: int
    ):
        super().__init__()
        self.gm = gm
        self.steps, self.values, self.shape, self.int8, self.isa, self.vw = (
            steps,
            values,
            shape,
            int8,
            isa,
            vw,
        )
        self.placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.replays: dict[int, object] = {}  # thread count -> runtime.replay.Replay, or None: the steps
        self.replay_reason: str | None = None

    # -- running ------------------------------------------------------------------------------------------
    def _arg(self, a, env: Env):
        if isinstance(a, fx.Node):
            return env.nchw[a] if a in env.nchw else env.tensor(self.values[a])
        return fx.node.map_aggregate(a, lambda x: self._arg(x, env) if isinstance(x, fx.Node) else x)

    def _torch(self, step: TorchStep, env: Env) -> None:
        for n in (step.node, *step.tail):
            self._node(n, env)

    def _node(self, n: fx.Node, env: Env) -> None:
        args = tuple(self._arg(a, env) for a in n.args)
        kwargs = {k: self._arg(a, env) for k, a in n.kwargs.items()}
        if n.op == "call_module":
            out = self.gm.get_submodule(n.target)(*args, **kwargs)
        elif n.op == "call_function":
            out = n.target(*args, **kwargs)
        elif n.op == "call_method":
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:  # get_attr
            out = self.gm
            for part in n.target.split("."):
                out = getattr(out, part)
        env.nchw[n] = out

    def run_step(self, step, env: Env) -> None:
        if isinstance(step, TorchStep) and not step.exact:
            self._torch(step, env)
        else:
            step.run(env)

    def forward(self, x: Tensor):
        if torch.is_grad_enabled() and x.requires_grad:
            raise PrunekitError("the compiled model is inference-only: run it under torch.inference_mode()")
        if tuple(x.shape) != self.shape or x.dtype != torch.float32:
            return self.gm(x)
        n = threads.count()
        if n not in self.replays:  # a thread count not seen yet: its replay is built on this call
            self.prepare_replay(x)
        replay = self.replays[n]
        with threads.lingering():  # kernel after kernel: the workers spin between them
            return self._stepwise(x) if replay is None else replay(x)

    def _stepwise(self, x: Tensor):
        env = Env()
        env.nchw[self.placeholder] = x.contiguous()
        for step in self.steps:
            self.run_step(step, env)
        return self._arg(self.output.args[0], env)

    def prepare_replay(self, example: Tensor) -> None:
        """The pass as a list of kernel calls (:mod:`prunekit.runtime.replay`) for the current thread count,
        where it provably computes what the steps do (else the steps run); ``replay_reason`` says why not.
        ``runtime.compile`` calls it once the model's modules are final."""
        from prunekit.runtime import replay

        why, finish = self._replayable()
        made = None
        if why is None:
            with threads.lingering():
                made = replay.build(self._stepwise, finish, example)
            why = None if made is not None else "its kernel calls depend on more than the input image"
        self.replays[threads.count()] = made
        self.replay_reason = why

    def _replayable(self) -> tuple[str | None, Callable | None]:
        """(why not, None), or (None, the output's reader): every step's work is kernel calls, and the
        output is an int8 global pool's classifier on prunekit's gemv kernel."""
        last = self.steps[-1] if self.steps else None
        if not (isinstance(last, GlobalPoolStep) and last.exact and last.tail):
            return "its output is not an int8 global pool with a classifier", None
        head = self.gm.get_submodule(last.tail[-1].target)
        if self.output.args[0] is not last.tail[-1] or not isinstance(head, GemvLinear):
            return "its classifier does not run on prunekit's gemv kernel", None
        for step in self.steps:
            if isinstance(step, ConvStep) and step.kernel is None and not step.int8:
                return f"{step.name} runs on torch's dense path", None
            if isinstance(step, TorchStep) and step is not last:
                return f"{step.name} runs in torch", None
        n = head.out_features
        return None, lambda: last.result(n)

    def conv_steps(self) -> list[ConvStep]:
        return [s for s in self.steps if isinstance(s, ConvStep)]


# -- building ---------------------------------------------------------------------------------------------
def _conv_module(node: fx.Node, gm: fx.GraphModule, outs: dict) -> nn.Module | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is nn.Conv2d or (isinstance(mod, QuantizedConv2d) and mod.act_scale is not None):
        src = node.args[0]
        if isinstance(src, fx.Node) and _batch1_image(outs.get(src)) and _batch1_image(outs.get(node)):
            return mod if unsupported(mod) is None else None
    return None


def _chain(conv: fx.Node, gm: fx.GraphModule, outs: dict, int8: bool, taken: set, inner: set):
    """The nodes a convolution absorbs: [BatchNorm] [ReLU] [add r [ReLU]] while each has one reader (and no
    other step took it; ``inner``: nodes absorbed as intermediates, never materialised). The add is a float
    ``+`` or, in an integer int8 model, a ``prunekit.quant.glue.QuantizedAdd`` (int8 convolutions only).
    Returns (nodes, bn, clamp, residual node, the fused integer add or None)."""
    nodes, bn, clamp, resid, cur, qadd = [conv], None, NO_CLAMP, None, conv, None
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if u in taken:
            break
        c = _clamp_of(u, gm)
        operands = _add_operands(u, gm)
        if not int8 and bn is None and clamp == NO_CLAMP and resid is None and _bn(u, gm) is not None:
            bn = _bn(u, gm)
        elif _is_identity(u, gm):
            pass
        elif c is not None and clamp == NO_CLAMP:
            clamp = c
        elif operands is not None and resid is None and clamp == NO_CLAMP:
            other = operands[1] if operands[0] is cur else operands[0]
            if not isinstance(other, fx.Node) or other is cur or not _batch1_image(outs.get(other)):
                break
            if other in inner or outs[other].shape != outs[cur].shape or _depends_on(other, set(nodes), {}):
                break
            if u.op == "call_module":  # QuantizedAdd: fused only into an int8 epilogue
                if not int8:
                    break
                qadd = IntAdd.of(gm.get_submodule(u.target), conv_first=operands[0] is cur)
            resid = other
        else:
            break
        nodes.append(u)
        cur = u
    return nodes, bn, clamp, resid, qadd


def _pool_params(node: fx.Node, gm: fx.GraphModule) -> tuple[int, int, int] | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is not nn.MaxPool2d or mod.ceil_mode or mod.return_indices:
        return None
    k, s, p, d = (_pair_int(v) for v in (mod.kernel_size, mod.stride, mod.padding, mod.dilation))
    if None in (k, s, p) or d != 1 or 2 * p > k:
        return None
    return k, s, p


def _pair_int(v) -> int | None:
    if isinstance(v, int):
        return v
    if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1]:
        return int(v[0])
    return None


def _order(steps: list, producer_of: dict) -> list:
    """Steps in an order where every step's inputs (residual operands included) come first; otherwise the
    graph's order."""
    index = {id(s): i for i, s in enumerate(steps)}

    def deps(step) -> set:
        nodes = step.node.all_input_nodes if isinstance(step, TorchStep) else [step.inp.node]
        if isinstance(step, ConvStep) and step.residual is not None:
            nodes = [*nodes, step.residual.node]
        return {id(producer_of[n]) for n in nodes if n in producer_of}

    pending = {id(s): deps(s) for s in steps}
    done: set = set()
    out = []
    while len(out) < len(steps):
        ready = [s for s in steps if id(s) not in done and pending[id(s)] <= done]
        if not ready:  # a cycle cannot happen (fusion checks dependencies); keep the graph order then
            return steps
        first = min(ready, key=lambda s: index[id(s)])
        out.append(first)
        done.add(id(first))
    return out


def build(model: nn.Module, example: Tensor, *, vw: int | None = None, isa: str | None = None):
    """``(Segmented, "")``, or ``(None, why)`` when the model has nothing to run in the layout."""
    if not _batch1_image(example):
        return None, "segments need one batch-1 float32 image input"
    try:
        gm = fx.GraphModule(model, Tracer().trace(model))
    except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable code
        return None, f"the model does not fx-trace ({type(exc).__name__})"
    if sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
        return None, "segments need a model with one input"
    for node in list(gm.graph.nodes):  # identities (prunekit's FoldedBatchNorm too) pass their input on
        if _is_identity(node, gm) and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if _requantized_by_readers(node, gm):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
    outs = _record(gm, example)
    vw, isa = vw or host_width(), isa or isa_name()
    values: dict[fx.Node, Value] = {}

    def val(node: fx.Node) -> Value:
        if node not in values:
            values[node] = Value(node, tuple(outs[node].shape[1:]))
        return values[node]

    steps, absorbed, inner, producer_of = [], set(), set(), {}
    kinds = set()
    for node in gm.graph.nodes:
        if node in absorbed or node.op in ("placeholder", "output"):
            continue
        mod = _conv_module(node, gm, outs)
        if mod is not None:
            int8 = isinstance(mod, QuantizedConv2d)
            kinds.add(int8)
            nodes, bn, clamp, resid, qadd = _chain(node, gm, outs, int8, absorbed, inner)
            if int8:
                weight, bias = mod.weight_q.detach(), mod.bias
            elif bn is not None:
                weight, bias = fold_conv_bn(mod.weight, mod.bias, bn)
            else:
                weight, bias = mod.weight.detach().to(torch.float32), mod.bias
            step = ConvStep(
                node.target,
                mod,
                nodes,
                val(node.args[0]),
                val(nodes[-1]),
                weight=weight,
                bias=None if bias is None else bias.detach().to(torch.float32),
                clamp=clamp,
                residual=None if resid is None else val(resid),
                add=qadd,
            )
            absorbed.update(nodes)
            inner.update(nodes[:-1])
        elif _pool_params(node, gm) is not None and node.args and node.args[0] in producer_of:
            src = producer_of[node.args[0]]
            if not isinstance(src, (ConvStep, PoolStep)):
                step = TorchStep(node)
            else:
                step = PoolStep(node, val(node.args[0]), val(node), *_pool_params(node, gm))
        elif (pool := _global_pool(node, gm)) is not None and node.args[0] in producer_of:
            step = GlobalPoolStep(node, val(node.args[0]), pool, _pool_tail(node), gm)
            absorbed.update(step.tail)
            producer_of.update({n: step for n in step.tail})
        else:
            step = TorchStep(node)
        if not isinstance(step, TorchStep):
            step.out.producer = step
            producer_of[step.out.node] = step
        else:
            producer_of[node] = step
        steps.append(step)
    if not any(isinstance(s, ConvStep) for s in steps):
        return None, "no convolution the kernels support"
    if len(kinds) > 1:
        return None, "a mix of float32 and int8 convolutions"
    int8 = kinds.pop()
    steps = _order(steps, producer_of)
    _plan_layouts(steps, values, int8, isa, gm.graph)
    convs: list[ConvStep] = []  # the convolutions prepared so far (a later one may share their gathers)
    for s in steps:
        if isinstance(s, ConvStep):
            s.prepare(vw, isa, convs)
            convs.append(s)
        elif isinstance(s, (PoolStep, GlobalPoolStep)):
            s.prepare()
    return Segmented(gm, steps, values, tuple(example.shape), int8, isa, vw), ""


def _plan_layouts(steps: list, values: dict, int8: bool, isa: str, graph: fx.Graph) -> None:
    """Pitches, direct reads, column shifts, pad rows, which int8 values carry bytes and which floats;
    then the buffers."""
    tight = int8 and isa == "vnni512"
    for step in steps:  # forward: pitches and direct reads
        if isinstance(step, ConvStep):
            step.tight = tight
        if isinstance(step, GlobalPoolStep) and int8:
            _bytes_for(step.inp, float(step.module.scale_in), isa, conv_input=False)
        if isinstance(step, PoolStep):
            step.out.pitch = L.pitch_for(step.out.shape[2], tight)
            continue
        if not isinstance(step, ConvStep):
            continue
        inp, g = step.inp, step.geom
        _, h, w = inp.shape
        ho, wo = step.out_hw
        ok = inp.producer is not None and g.stride == (1, 1) and ho <= h and wo <= w and min(g.padding) >= 0
        if ok and int8:
            ok = _bytes_for(inp, float(step.module.act_scale.item()), isa)
        step.direct = ok
        if int8 and not ok and inp.producer is not None:  # the gather copies bytes when the producer has them
            _bytes_for(inp, float(step.module.act_scale.item()), isa)
        if ok:
            (kh, kw), (ph, pw), (dh, dw) = g.kernel, g.padding, g.dilation
            inp.shifts |= {j * dw - pw for j in range(kw)}
            inp.top = max(inp.top, ph)
            inp.bottom = max(inp.bottom, (ho - 1) + (kh - 1) * dh - ph - (h - 1))
        step.out.pitch = step.out_pitch
        if step.add is not None and step.residual.producer is not None:  # the integer chain reads bytes
            _bytes_for(step.residual, step.add.scale_b, isa, conv_input=False)
    for step in steps:  # forward, so that every residual's producer has decided first
        if int8 and isinstance(step, ConvStep):
            step.chain = _chain_ok(step)
        elif isinstance(step, GlobalPoolStep):
            v = step.inp
            step.exact = exact_bytes(v) and np.float32(v.byte_scale) == np.float32(step.module.scale_in)
    for v in values.values():
        if v.producer is not None and (not int8 or v.byte_scale is None):
            v.needs_float = True
    output = next(n for n in graph.nodes if n.op == "output")
    for n in output.all_input_nodes:
        if n in values and not exact_bytes(values[n]):
            values[n].needs_float = True
    for step in reversed(steps):  # backward: who needs float32 planes
        if isinstance(step, ConvStep):
            if step.residual is not None and not step.chain:
                step.residual.needs_float = True
            if not int8 or (not step.direct and step.inp.byte_scale != float(step.module.act_scale.item())):
                step.inp.needs_float = True
        elif isinstance(step, PoolStep):
            if step.out.needs_float or not int8:
                step.inp.needs_float = True
        else:
            for n in step.node.all_input_nodes:
                if n in values and not exact_bytes(values[n]):
                    values[n].needs_float = True
    for v in values.values():
        if v.producer is None:
            continue
        c = v.shape[0]
        if not int8 or v.needs_float:  # int8: room for whole groups of 4 channels (the epilogue's unit)
            shifts, units = (v.shifts, c) if not int8 else ({0}, L.roundup(c, 4))
            v.floats = L.planes(units, v.shape[1], v.shape[2], v.top, v.bottom, shifts, pitch=v.pitch)
        if int8 and v.byte_scale is not None:
            v.bytes_ = v.layout(-(-c // 4))
    _allocate(steps, values, graph)


def _allocate(steps: list, values: dict, graph: fx.Graph) -> None:
    """Buffers for every value's planes, reused once the value is dead: a later value of the identical
    layout takes the buffer over (its padding, never written, is zero in both), which keeps the working set
    of a forward pass in cache. A value lives from its producer to its last reader (the graph's outputs:
    to the end)."""
    last: dict[fx.Node, int] = {}
    for i, step in enumerate(steps):
        if isinstance(step, TorchStep):
            read = step.node.all_input_nodes
        else:
            read = [step.inp.node] + ([step.residual.node] if getattr(step, "residual", None) else [])
        for n in read:
            last[n] = i
    output = next(n for n in graph.nodes if n.op == "output")
    for n in output.all_input_nodes:
        last[n] = len(steps)
    free: dict[tuple, list[np.ndarray]] = {}

    def take(layout: L.Layout, fill: int) -> np.ndarray:
        pool = free.get((layout, fill))
        return pool.pop() if pool else layout.alloc(fill)

    for i, step in enumerate(steps):
        v = getattr(step, "out", None)
        if v is not None and v.producer is step:
            if v.floats is not None:
                v.fbuf = take(v.floats, 0)
            if v.bytes_ is not None:
                v.bbuf = take(v.bytes_, int(L.ZERO_OFFSET) if v.offset else 0)
        for n, end in last.items():
            if end == i and n in values:
                dead = values[n]
                if dead.fbuf is not None:
                    free.setdefault((dead.floats, 0), []).append(dead.fbuf)
                if dead.bbuf is not None:
                    fill = int(L.ZERO_OFFSET) if dead.offset else 0
                    free.setdefault((dead.bytes_, fill), []).append(dead.bbuf)


def _chain_ok(step: ConvStep) -> bool:
    """Whether the convolution's epilogue can stay in integers (``conv.chain_reason``), its residual (a
    fused integer add's other operand) read from exact bytes at the add's scale and this output's pitch."""
    taps = int(np.prod(step.weight.shape[1:])) if step.int8 else 0
    if chain_reason(step.requant, step.clamp, step.add, step.out.byte_scale, taps) is not None:
        return False
    r = step.residual
    if r is None:
        return True
    return (
        step.add is not None
        and exact_bytes(r)
        and np.float32(r.byte_scale) == np.float32(step.add.scale_b)
        and r.pitch == step.out_pitch
    )


def _bytes_for(v: Value, scale: float, isa: str, conv_input: bool = True) -> bool:
    """Make ``v``'s producer write int8 bytes at ``scale`` (through max pools); False when it cannot.
    ``conv_input``: a convolution reads them (+128-encoded signed bytes need VNNI there; an integer add's
    residual reads them with integer operations on any instruction set)."""
    step = v.producer
    if isinstance(step, PoolStep):
        if not _bytes_for(step.inp, scale, isa, conv_input):
            return False
    elif not (isinstance(step, ConvStep) and step.int8):
        return False
    if v.byte_scale not in (None, scale):
        return False
    offset = 0 if nonneg(v) else 128
    if offset and isa != "vnni512" and conv_input:
        return False
    v.byte_scale, v.offset = scale, offset
    return True


def _label(cfg: tuple) -> str:
    nv, cb, *kind = cfg
    if len(kind) > 1 and kind[1]:
        return f"channels/nv{nv}"
    return f"nv{nv}/cb{cb or 'all'}" + ("/shared" if kind and kind[0] else "")


def tune(seg: Segmented, example: Tensor, rounds: int = 7) -> None:
    """Pick each convolution's tile (and dense where faster, float32; the exact float32 path, int8) by
    timing it in place on ``example``'s real activations, interleaved; conversions it needs are counted."""
    for step in seg.conv_steps():  # a first configuration everywhere, so every buffer gets real data
        step.kernel = step.make_kernel(*step.configs()[0]) if step.usable() is None else None
    env = Env()
    with torch.inference_mode():
        env.nchw[seg.placeholder] = example.contiguous()
        for step in seg.steps:
            seg.run_step(step, env)
    born = {n: t for n, t in env.nchw.items() if n not in seg.values or seg.values[n].producer is None}
    # as in a forward pass, the workers spin between kernels; time_interleaved sends them to sleep before
    # each candidate, so at 2+ threads each is timed on its second call in a row, when they are awake again
    calls = 2 if threads.count() > 1 else 1
    with torch.inference_mode(), threads.lingering():
        for step in seg.conv_steps():
            kernels = {}
            if step.usable() is None:
                kernels = {_label(cfg): step.make_kernel(*cfg) for cfg in step.configs()}
            else:
                step.reason = step.usable()
            kernels["dense"] = None

            def run(k, step=step):
                step.kernel = k
                e = Env()
                e.nchw.update(born)
                step.run(e)

            medians = time_interleaved(
                {name: (lambda k=k: run(k)) for name, k in kernels.items()}, rounds, calls=calls
            )
            step.timings = medians
            best = min(medians, key=medians.get)
            step.choice, step.kernel = best, kernels[best]
            if best == "dense" and not step.reason:
                step.reason = "dense measured faster here"
            elif best != "dense" and threads.chunks(step.kernel.macs) > 1:
                _pick_threads(step, run, rounds)


def _pick_threads(step, run: Callable, rounds: int) -> None:
    """The chosen kernel on torch's threads or on one (label ``@1t``), whichever is faster in place: handing
    a chunk to a worker costs 5-10 us (runtime/threads.py), more than a short layer's second half saves."""
    k = step.kernel

    def on(serial: bool) -> None:
        k.serial = serial
        run(k)

    # two calls in a row, the second timed: a worker left asleep by the calls before (then its call runs
    # alone while it wakes, runtime/threads.py) is awake for the second, as inside a forward pass
    medians = time_interleaved({"threads": lambda: on(False), "serial": lambda: on(True)}, rounds, calls=2)
    k.serial = medians["serial"] < medians["threads"]
    if k.serial:
        step.choice += threads.SERIAL
        step.timings[step.choice] = medians["serial"]
