"""Batch-1 Linear layers for decoding: :class:`GemvLinear` runs one packed weight layout
(:mod:`prunekit.runtime.gemv_formats`) through its kernel (:mod:`prunekit.runtime.gemv_kernels`) when the
layer sees one activation vector (a decode step), and ``F.linear`` on the dense weight the layout represents
for anything larger (the prompt), so a compiled language model generates exactly what the layout computes.

:func:`candidates` lists the layouts worth timing for one ``nn.Linear`` (or Hugging Face ``Conv1D``) at
batch 1; :func:`prunekit.runtime.compile` times them against the dense layer and keeps the fastest.

Value types: ``float32`` (same weights, same output within float32 rounding), ``bfloat16`` and ``int8``
(weight-only, per-row scales: the layer then computes with the rounded weights, which is a different model
than the float32 one, as with any quantization). With ``activations="int8"`` the int8 block kernels also
quantize the activation vector per call (prunekit's rounding rule) and sum in exact int32 arithmetic.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.calib.blocks import out_in_weight
from prunekit.compress.container import StoredTensor, load_stored
from prunekit.errors import PrunekitError
from prunekit.masking import type_name
from prunekit.quant.layers import QuantizedLinear
from prunekit.quant.rounding import dequantize, quantize_activation, quantize_int8
from prunekit.runtime import gemv_kernels as K
from prunekit.runtime import threads
from prunekit.runtime.cpu import features
from prunekit.runtime.gemv_formats import (
    BLOCK_ROWS,
    MAX_COLUMNS,
    NM_PATTERNS,
    ROW_GROUP,
    GemvWeight,
    block_from_parts,
    block_stats,
    check_values,
    nm_chunk,
    nm_fits,
    pack_block,
    pack_block_vnni,
    pack_csr4,
    pack_dense,
    pack_nm,
)
from prunekit.runtime.kernels import finish_int8_requant

ACTIVATIONS = ("float32", "int8")
MIN_BLOCK_FILL = 0.5  # a block layout storing more than twice the non-zeros cannot beat CSR or dense
MIN_BLOCK_EMPTY = 0.25  # nor one that skips less than a quarter of the blocks (e.g. 2:4 in 4x1 blocks)
MIN_CSR_SPARSITY = 0.4  # below this the dense kernel streams fewer bytes than CSR's 6 per non-zero
_EMPTY = np.zeros(0, np.float32)


def check_decode_options(values: str, activations: str) -> None:
    """One clear error for value / activation types the decode kernels do not have."""
    check_values(values)
    if activations not in ACTIVATIONS:
        raise PrunekitError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or Hugging Face's ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, nn.Linear) or (type_name(module) == "Conv1D" and module.weight.dim() == 2)


def nm_isa() -> str | None:
    """The N:M kernel this CPU runs: ``avx512``, ``avx2``, or None."""
    f = features()
    return "avx512" if f.avx512 else "avx2" if f.avx2 else None


class GemvLinear(nn.Module):
    """A Linear layer on one batch-1 layout. ``layout``: ``dense``, ``block<R>`` (R in 4, 8, 16),
    ``nm<N>:<M>`` (2:4, 4:8), ``csr4``; ``values``: float32, bfloat16, int8; ``activations``: float32, or int8
    (block layouts with int8 values: exact int32 sums, VNNI where the CPU has it unless ``vnni=False``)."""

    def __init__(
        self,
        module: nn.Module,
        layout: str = "dense",
        values: str = "float32",
        activations: str = "float32",
        vnni: bool | None = None,
    ) -> None:
        super().__init__()
        if not is_linear(module):
            raise PrunekitError(f"GemvLinear wraps nn.Linear or Conv1D, got {type(module).__name__}")
        check_decode_options(values, activations)
        weight = out_in_weight(module).to(torch.float32)
        self._setup(self._pack(weight, layout, values, activations, vnni), module.bias, layout, activations)

    @classmethod
    def from_quantized(cls, module: nn.Module, rows: int = 16, vnni: bool | None = None) -> GemvLinear:
        """A :class:`prunekit.quant.layers.QuantizedLinear` (an int8 classifier) on the exact int8 block
        kernels, bit-identical to ``module(x)`` on one activation vector: the module's activation rounding
        (its static ``act_scale``, else dynamic), exact int32 sums of its own ``weight_q`` (``vpdpbusd`` where
        the CPU has VNNI, unless ``vnni=False``), its finish: ``float32(acc) * (s_x * s_w) + b``, or in the
        integer output form ``float32(requantize_value(acc + bias_q, M, sh, lo, hi)) * s_out``. Any other
        input runs ``module`` itself."""
        if not isinstance(module, QuantizedLinear):
            raise PrunekitError(f"from_quantized takes a QuantizedLinear, got {type_name(module)}")
        if rows not in BLOCK_ROWS:
            raise PrunekitError(f"block layouts have R in {BLOCK_ROWS}, got {rows}")
        q = module.weight_q
        scale = module.weight_scale.to(torch.float32).reshape(-1).expand(q.shape[0]).contiguous()
        use_vnni = features().vnni if vnni is None else vnni
        if use_vnni and not features().vnni:
            raise PrunekitError("the VNNI block kernel needs AVX-512 VNNI, which this CPU lacks")
        shape_only = torch.empty(q.shape, dtype=torch.float32)
        packed = (
            pack_block_vnni(shape_only, rows, (q, scale))
            if use_vnni
            else pack_block(shape_only, rows, "int8", (q, scale))
        )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(packed, module.bias, f"block{rows}", "int8")
        layer.source = module
        layer._act_scale = None if module.act_scale is None else np.float32(module.act_scale.item())
        if module.integer_output:
            pad = packed.rows - q.shape[0]  # padding rows: zero sums, any shift >= 1

            def row(t: Tensor, fill: int) -> np.ndarray:
                t = t.to(torch.int64).reshape(-1).expand(q.shape[0])
                return np.pad(t.numpy(), (0, pad), constant_values=fill)

            lo, hi = (int(v) for v in module.out_range)
            constants = (row(module.bias_q, 0), row(module.out_mult, 0), row(module.out_shift, 1))
            layer._requant = (*constants, lo, hi, np.float32(module.out_scale.item()))
        return layer

    @classmethod
    def from_packed(
        cls, packed: GemvWeight, bias: Tensor | None = None, layout: str | None = None
    ) -> GemvLinear:
        """A layer on an already packed weight (e.g. read from a compressed file as stored); float
        activations."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if layout is None:
            kind = packed.layout
            layout = {
                "block": f"block{packed.params.get('rows')}",
                "nm": f"nm{packed.params.get('m', 4) // 2}:{packed.params.get('m', 4)}",
            }.get(kind, kind)
        layer._setup(packed, bias, layout, "float32")
        return layer

    def _setup(self, packed: GemvWeight, bias: Tensor | None, layout: str, activations: str) -> None:
        self.out_features, self.in_features = packed.shape
        self.layout, self.values, self.activations = layout, packed.values, activations
        self.packed = packed
        self.source: nn.Module | None = None  # the int8 layer this one computes (from_quantized)
        self._act_scale = None  # its static activation scale (float32), else dynamic
        self._requant: tuple | None = None  # its integer output form's constants (from_quantized)
        weight = packed.effective
        self.bias_np = (
            _EMPTY
            if bias is None
            else np.pad(bias.detach().to(torch.float32).numpy(), (0, self.packed.rows - self.out_features))
        )
        self.bias = None if bias is None else bias.detach().to(torch.float32).clone()
        self.weight = self.packed.effective  # the dense weight this layout represents (prompt steps use it)
        self._work = self.packed.nbytes  # threads split calls above threads.MIN_PARALLEL_WORK
        self._cuts: dict[int, list[int]] = {}
        # one thread whatever torch's count: waking a pool thread costs tens of microseconds, as much as a
        # decode layer's whole product, so compile also times each layout serial (candidates' "@1t")
        self.serial = False
        rows = self.packed.rows
        self.exact = activations == "int8"  # compile compares with reference() bit for bit
        if activations == "int8":
            self._q, self._scale = quantize_int8(weight)
            self._xq = np.zeros(self.in_features, np.int8)
            self._xu = np.zeros(self.in_features, np.uint8)
            self._acc = np.zeros(rows, np.int32)
            self._bias_out = _EMPTY if bias is None else self.bias_np
        self._bind()

    @staticmethod
    def _pack(weight: Tensor, layout: str, values: str, activations: str, vnni: bool | None) -> GemvWeight:
        if activations == "int8" and (values != "int8" or not layout.startswith("block")):
            raise PrunekitError("int8 activations run on the block layouts with int8 values only")
        if layout == "dense":
            return pack_dense(weight, values)
        if layout == "csr4":
            return pack_csr4(weight, values)
        if layout.startswith("block"):
            rows = int(layout.removeprefix("block"))
            if rows not in BLOCK_ROWS:
                raise PrunekitError(f"block layouts have R in {BLOCK_ROWS}, got {layout!r}")
            use_vnni = features().vnni if vnni is None else vnni
            if activations == "int8" and use_vnni:
                if not features().vnni:
                    raise PrunekitError("the VNNI block kernel needs AVX-512 VNNI, which this CPU lacks")
                return pack_block_vnni(weight, rows)
            return pack_block(weight, rows, values)
        if layout.startswith("nm"):
            n, _, m = layout.removeprefix("nm").partition(":")
            isa = nm_isa()
            if not (n.isdigit() and m.isdigit() and int(m) in NM_PATTERNS and 2 * int(n) == int(m)):
                raise PrunekitError(f"N:M layouts are nm2:4 and nm4:8, got {layout!r}")
            if isa is None:
                raise PrunekitError("the N:M kernels need AVX2 + FMA or AVX-512")
            return pack_nm(weight, int(m), isa, values)
        raise PrunekitError(f"unknown layout {layout!r}; allowed: dense, block4/8/16, nm2:4, nm4:8, csr4")

    # -- execution ------------------------------------------------------------------------------------
    def _units(self) -> tuple[int, np.ndarray | None]:
        """Row units a call can be split into, and their cumulative work (None: even)."""
        p = self.packed
        if p.layout in ("block", "block-vnni"):
            return p.rows // p.params["rows"], p.arrays["ptr" if p.layout == "block" else "gptr"]
        if p.layout == "nm":
            return p.rows // ROW_GROUP, None
        if p.layout == "csr4":
            return p.rows, p.arrays["ptr"]
        return p.rows, None

    def _split(self) -> list[int]:
        parts = 1 if self.serial or torch.get_num_threads() == 1 else threads.chunks(self._work // 4)
        cuts = self._cuts.get(parts)
        if cuts is None:
            units, cum = self._units()
            if parts == 1 or cum is None:
                cuts = threads.even_splits(units, parts, align=1)
            else:
                at = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts)
                cuts = [0, *sorted({int(a) for a in at if 0 < a < units}), units]
            self._cuts[parts] = cuts
        return cuts

    def _bind(self) -> None:
        """``self._kernel(x, y, lo, hi)``: the layout's driver with its arrays bound (fewer Python steps per
        call: at batch 1 a small layer's kernel takes about as long as the glue around it)."""
        p, a, b = self.packed, self.packed.arrays, self.bias_np
        if self.activations == "int8":
            xq, xu, acc = self._xq, self._xu, self._acc
            if p.layout == "block-vnni":
                rows, gptr, idx, vals, wsum = p.params["rows"], a["gptr"], a["idx"], a["vals"], a["wsum128"]
                self._kernel = lambda x, y, lo, hi: K.block_vnni_gemv(
                    gptr, idx, vals, xu, wsum, acc, rows, lo, hi
                )
            else:
                rows, ptr, idx, vals = p.params["rows"], a["ptr"], a["idx"], a["vals"]
                self._kernel = lambda x, y, lo, hi: K.block_q_gemv(ptr, idx, vals, xq, acc, rows, lo, hi)
        elif p.layout == "dense":
            w, scale = a["w"], p.scale
            self._kernel = lambda x, y, lo, hi: K.dense_gemv(w, scale, x, b, y, lo, hi)
        elif p.layout == "block":
            rows, ptr, idx, vals, scale = p.params["rows"], a["ptr"], a["idx"], a["vals"], p.scale
            self._kernel = lambda x, y, lo, hi: K.block_gemv(ptr, idx, vals, scale, x, b, y, rows, lo, hi)
        elif p.layout == "nm":
            nm = K.nm_gemv_avx512 if p.params["isa"] == "avx512" else K.nm_gemv_avx2
            m, meta, vals, scale = p.params["m"], a["meta"], a["vals"], p.scale
            self._kernel = lambda x, y, lo, hi: nm(meta, vals, scale, x, b, y, m, lo, hi)
        else:
            ptr, idx, vals, scale = a["ptr"], a["idx"], a["vals"], p.scale
            self._kernel = lambda x, y, lo, hi: K.csr4_gemv(ptr, idx, vals, scale, x, b, y, lo, hi)

    def gemv(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``W x (+ b)`` for one float32 activation vector; returns ``rows`` outputs (padding at the end),
        in ``out`` when given (float32, ``rows`` of them). The kernels go through ``threads.run`` /
        ``threads.call`` (a segment's pass records them)."""
        rows = self.packed.rows
        y = np.empty(rows, np.float32) if out is None else out
        cuts = self._split()
        if self.activations == "int8":
            s = (
                threads.call(K.quantize_activation, x, self._xq, self._xu)
                if self._act_scale is None
                else threads.call(K.quantize_static, x, self._act_scale, self._xq, self._xu)
            )
        if len(cuts) == 2:
            threads.call(self._kernel, x, y, 0, cuts[1])
        else:
            threads.run(self._kernel, [(x, y, cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)])
        if self._requant is not None:
            bias_q, mult, shift, lo, hi, out_scale = self._requant
            threads.call(finish_int8_requant, self._acc.reshape(1, rows, 1), bias_q, mult, shift, lo, hi,
                         out_scale, y.reshape(1, rows, 1))  # fmt: skip
        elif self.activations == "int8":
            threads.call(K.finish_int8, self._acc, s, self.packed.scale, self._bias_out, y, 0, rows)
        return y

    def forward(self, x: Tensor) -> Tensor:
        # the common decode case first, with as few tensor calls as possible: at batch 1 the glue around a
        # small layer's kernel costs about as much as the kernel
        if (
            x.numel() == self.in_features
            and x.dtype == torch.float32
            and x.is_cpu
            and not x.requires_grad
            and x.is_contiguous()
            and x.shape[-1] == self.in_features
        ):
            y = self.gemv(x.numpy().reshape(-1))[: self.out_features]
            return torch.from_numpy(y.reshape(*x.shape[:-1], self.out_features))
        if x.shape[-1] != self.in_features:
            raise PrunekitError(f"GemvLinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        if self.source is not None:  # an int8 layer's kernel: anything but one float32 vector runs the layer
            return self.source(x)
        if x.numel() != self.in_features or not x.is_cpu or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = self.gemv(x.detach().to(torch.float32).contiguous().numpy().reshape(-1))[: self.out_features]
        return torch.from_numpy(y.reshape(*x.shape[:-1], self.out_features)).to(x.dtype)

    def reference(self, x: Tensor) -> Tensor:
        """What a batch-1 call computes, in torch: ``F.linear`` on the weights the layout holds; with int8
        activations the exact integer product ``float32(q_w @ q_x) * (s_x * s_w) + b`` (prunekit's rule); for
        a layer made by :meth:`from_quantized`, that layer's own forward."""
        if self.source is not None:
            return self.source(x)
        if self.activations == "float32":
            return F.linear(x, self.weight, self.bias)
        xq, s_x = quantize_activation(x.reshape(-1))
        acc = (self._q.to(torch.int64) @ xq.to(torch.int64)).to(torch.int32).to(torch.float32)
        y = acc * (s_x * self._scale)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
            f"values={self.values}, activations={self.activations}, "
            f"bytes/weight={self.packed.bytes_per_weight:.3f}"
        )


SERIAL = threads.SERIAL  # the label suffix of a layout timed on one thread (GemvLinear.serial)


def label(layout: str, activations: str = "float32") -> str:
    """The name a layout has in the runtime report: ``gemv:block8``, ``gemv:block8/q8`` (int8 activations)."""
    return f"gemv:{layout}" + ("/q8" if activations == "int8" else "")


def candidates(module: nn.Module, values: str = "float32", activations: str = "float32") -> dict:
    """Layouts worth timing for ``module`` at batch 1, as ``label -> factory``: always ``dense``, a block
    layout when the zeros come in R x 1 blocks (a quarter of the blocks empty, half of each kept block
    non-zero), N:M when the
    weight is 2:4 (else 4:8), CSR-4 from 40% sparsity; with ``activations="int8"`` (int8 values) the
    exact-int8 block kernels too. With more than one thread, each of them also on one thread (``@1t``)."""
    weight = out_in_weight(module)
    out, inn = weight.shape
    made = {label("dense"): lambda: GemvLinear(module, "dense", values)}
    if weight.numel() == 0:
        return made
    nz = int(torch.count_nonzero(weight))
    sparsity = 1.0 - nz / weight.numel()
    if inn > MAX_COLUMNS or sparsity == 0.0:
        return made
    for r in BLOCK_ROWS:
        fill, empty = block_stats(weight, r)
        if fill >= MIN_BLOCK_FILL and empty >= MIN_BLOCK_EMPTY:
            made[label(f"block{r}")] = lambda r=r: GemvLinear(module, f"block{r}", values)
            if activations == "int8" and values == "int8":
                made[label(f"block{r}", "int8")] = lambda r=r: GemvLinear(module, f"block{r}", values, "int8")
    isa = nm_isa()
    if isa is not None and inn % nm_chunk(isa)[1] == 0:
        for m in NM_PATTERNS:
            if nm_fits(weight, m):
                made[label(f"nm{m // 2}:{m}")] = lambda m=m: GemvLinear(module, f"nm{m // 2}:{m}", values)
                break
    if sparsity >= MIN_CSR_SPARSITY:
        made[label("csr4")] = lambda: GemvLinear(module, "csr4", values)
    if threads.count() > 1:  # each layout on one thread too (see GemvLinear.serial)
        for name, make in list(made.items()):
            made[name + SERIAL] = lambda make=make: _serial(make())
    return made


def quantized_candidates(module: nn.Module) -> dict:
    """The exact int8 kernel (:meth:`GemvLinear.from_quantized`) for a ``QuantizedLinear`` at batch 1 (float
    or integer output form), as ``label -> factory`` (also on one thread when there are more)."""
    made = {label("block16", "int8"): lambda: GemvLinear.from_quantized(module, 16)}
    if threads.count() > 1:
        made[label("block16", "int8") + SERIAL] = lambda: _serial(GemvLinear.from_quantized(module, 16))
    return made


def _serial(layer: GemvLinear) -> GemvLinear:
    layer.serial = True
    return layer


def _stored_values(st: StoredTensor) -> tuple[str, Tensor]:
    """(value type, dense float32 weight) of a stored tensor: int8 with its scales, bfloat16, else float32."""
    if st.scale is not None:
        return "int8", dequantize(st.tensor, st.scale, torch.float32)
    if st.tensor.dtype == torch.bfloat16:
        return "bfloat16", st.tensor.to(torch.float32)
    return "float32", st.tensor.to(torch.float32)


def _layer_from_stored(module: nn.Module, st: StoredTensor) -> GemvLinear:
    values, dense = _stored_values(st)
    enc = st.encoded
    if enc.encoding == "block" and isinstance(module, nn.Linear):  # the stored layout is the kernel's
        rows = int(enc.params["rows"])
        stored = enc.parts["values"]
        vals = stored.view(torch.int16).numpy().view(np.uint16) if values == "bfloat16" else stored.numpy()
        if values == "float32":
            vals = vals.astype(np.float32)
        scale = np.zeros(0, np.float32) if st.scale is None else st.scale.numpy().astype(np.float32)
        packed = block_from_parts(
            vals,
            enc.parts["indptr"].numpy(),
            enc.parts["indices"].numpy(),
            rows,
            tuple(dense.shape),
            values,
            scale,
            dense,
        )
        return GemvLinear.from_packed(packed, module.bias)
    weight = dense if isinstance(module, nn.Linear) else dense.T  # Conv1D stores (in, out)
    probe = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    probe.weight.data = weight
    # N:M positions are in the file either way: at exactly N:M a bitmask costs the same bytes as the slots
    isa = nm_isa()
    if (
        enc.encoding in ("nm", "bitmask", "csr")
        and isa is not None
        and weight.shape[1] % nm_chunk(isa)[1] == 0
    ):
        for m in NM_PATTERNS:
            if nm_fits(weight, m):
                return _with_bias(GemvLinear(probe, f"nm{m // 2}:{m}", values), module)
    sparse = enc.encoding in ("bitmask", "csr") and weight.shape[1] <= MAX_COLUMNS
    return _with_bias(GemvLinear(probe, "csr4" if sparse else "dense", values), module)


def _with_bias(layer: GemvLinear, module: nn.Module) -> GemvLinear:
    if module.bias is not None:
        layer.bias = module.bias.detach().to(torch.float32).clone()
        layer.bias_np = np.pad(layer.bias.numpy(), (0, layer.packed.rows - layer.out_features))
        if layer.activations == "int8":
            layer._bias_out = layer.bias_np
        layer._bind()
    return layer


def from_compressed(model: nn.Module, path: str | Path) -> nn.Module:
    """A copy of ``model`` holding the weights of a compressed file (``prunekit compress``): every Linear
    stored as R x 1 blocks runs the block kernel on the stored arrays as they are, N:M ones the N:M kernel
    (slots interleaved at load), other sparse ones CSR-4, dense ones the dense kernel, in the stored value
    type (int8 with its scales, bfloat16, float32); every other tensor is loaded (int8 dequantized). For
    serving at batch 1 without compile's timing; ``model`` is not changed."""
    stored = load_stored(path)
    out = copy.deepcopy(model).eval()
    state = {
        name: _stored_values(st)[1] if st.scale is not None else st.tensor for name, st in stored.items()
    }
    own = out.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise PrunekitError(f"{path}: tensors not in the model: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype).reshape(own[name].shape))
    for name, module in list(out.named_modules()):
        key = f"{name}.weight"
        if is_linear(module) and key in stored:
            parent, _, child = name.rpartition(".")
            setattr(
                out.get_submodule(parent) if parent else out, child, _layer_from_stored(module, stored[key])
            )
    return out
