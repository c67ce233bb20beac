"""Inference-only layers that run the sparse kernels: float32 and int8, Linear and Conv2d.

Each layer holds its weight as a :class:`~prunekit.runtime.formats.SparseWeight` (numpy arrays, not
parameters: these modules are a compiled artifact, the original model stays the thing to train and save) and
one ``kernel`` name, chosen by :func:`prunekit.runtime.compile` by timing:

* ``"rows"`` -- one CSR row per output, activations gathered (batch 1 and small batches),
* ``"xt"``  -- activations transposed so each nonzero scales a contiguous row (batches, im2col convs),
* ``"xt-nchw"`` (convolutions) -- the same kernel image by image, with no permuted copies,
* ``"direct"`` (float32 convolutions) -- direct sparse convolution, no im2col (Park et al. 2017, "Faster CNNs
  with Direct Sparse Convolutions and Guided Pruning"; :func:`kernels.direct_conv`),
* ``"dense"`` (int8 only) -- the exact int8 arithmetic as a float32 GEMM on integer values: exact because
  every partial sum stays below 2**24 (checked at construction), and as fast as dense float32.

:class:`SparseLinearChain` runs two ``xt`` Linears around an elementwise activation with the activations
kept transposed in between (made by ``compile`` for ``nn.Sequential`` runs Linear -> activation -> Linear).

Convolutions (but ``direct``) are lowered to one sparse GEMM: ``W (Cout x Cin*kh*kw) @ cols
(Cin*kh*kw x N*Hout*Wout)`` with ``cols`` from ``F.unfold`` (for 1x1 convolutions the input itself, no copy
at batch 1). The int8 layers
follow ``prunekit.quant.layers`` bit for bit: the same activation rounding, exact integer sums, then the
layer's output form: the fixed-point requantization of :mod:`prunekit.quant.rounding` (integer models),
or one float32 product and one float32 sum.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.quant.glue import QuantizedAdd, QuantizeInput
from prunekit.runtime import kernels, threads
from prunekit.runtime.formats import FLOAT32_EXACT, SparseWeight, int8_row_bound, pack

FLOAT_KERNELS = ("rows", "xt")
INT8_KERNELS = ("rows", "xt", "dense")


def _rows(w: SparseWeight, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``(M, in) -> (M, out)`` with the rows kernel (bias fused)."""
    y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    cuts = w.row_splits(threads.chunks(w.nnz * x.shape[0]))
    parts = [(w.indptr[0], w.idx, w.vals, x, bias, y, cuts[c], cuts[c + 1]) for c in range(cuts.size - 1)]
    threads.run(kernels.csr_rows, parts)
    return y


def _transpose(x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x.T`` (+ bias per output column) in C order; numpy's strided copy is several times slower."""
    out = np.empty((x.shape[1], x.shape[0]), dtype=np.float32)
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(0, np.float32)
    cuts = threads.even_splits(x.shape[0], threads.chunks(x.size // 4))
    parts = [(x, out, b, has_bias, cuts[c], cuts[c + 1]) for c in range(len(cuts) - 1)]
    threads.run(kernels.transpose, parts)
    return out


_NO_BIAS = np.zeros(0, np.float32)


def _xt_images(w: SparseWeight, cols: np.ndarray) -> np.ndarray:
    """``(N, in, L) -> (N, out, L)``: the ``xt`` kernel per image (NCHW convolutions without permutes)."""
    y = np.empty((cols.shape[0], w.shape[0], cols.shape[2]), dtype=np.float32)
    cuts = w.row_splits(threads.chunks(w.nnz * cols.shape[0] * cols.shape[2]))
    parts = [
        (w.indptr, w.idx, w.vals, w.block, cols, y, _NO_BIAS, False, cuts[c], cuts[c + 1])
        for c in range(cuts.size - 1)
    ]
    threads.run(kernels.csr_xt_images, parts)
    return y


def _xt(w: SparseWeight, xT: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``(in, P) -> (out, P)`` (+ bias per output row) with the transposed-activation kernel."""
    if xT.strides[1] != 4:
        xT = np.ascontiguousarray(xT)
    y = np.empty((w.shape[0], xT.shape[1]), dtype=np.float32)
    cuts = w.row_splits(threads.chunks(w.nnz * xT.shape[1]))
    b, has_bias = (_NO_BIAS, False) if bias is None else (bias, True)
    parts = [
        (w.indptr, w.idx, w.vals, w.block, xT, y, b, has_bias, cuts[c], cuts[c + 1])
        for c in range(cuts.size - 1)
    ]
    threads.run(kernels.csr_xt, parts)
    return y


class _RuntimeLayer(nn.Module):
    """Shared checks: these layers compute, they do not learn."""

    kernel: str

    def _check(self, x: Tensor) -> None:
        if torch.is_grad_enabled() and x.requires_grad:
            raise PrunekitError(
                f"{type(self).__name__} is inference-only (no gradients): run it under torch.no_grad() or "
                "torch.inference_mode(), and train the original model instead"
            )
        if x.device.type != "cpu":
            raise PrunekitError(f"{type(self).__name__} runs on the CPU, got a tensor on {x.device}")
        if not x.is_floating_point():
            raise PrunekitError(f"{type(self).__name__} expects floating-point input, got {x.dtype}")

    @staticmethod
    def _array(x: Tensor) -> np.ndarray:
        return x.detach().to(torch.float32).contiguous().numpy()


class _LinearBase(_RuntimeLayer):
    def __init__(self, in_features: int, out_features: int, kernel: str, allowed: tuple[str, ...]) -> None:
        super().__init__()
        if kernel not in allowed:
            raise PrunekitError(
                f"unknown kernel '{kernel}' for {type(self).__name__}; allowed: {', '.join(allowed)}"
            )
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel

    def _flat(self, x: Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
        self._check(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise PrunekitError(
                f"{type(self).__name__} expects inputs (..., {self.in_features}), got {tuple(x.shape)}"
            )
        return self._array(x.reshape(-1, self.in_features)), tuple(x.shape[:-1])


class SparseLinear(_LinearBase):
    """``nn.Linear`` with a sparse float32 weight; same output within float32 rounding."""

    def __init__(self, linear: nn.Linear, kernel: str = "rows", block: int | None = None) -> None:
        super().__init__(linear.in_features, linear.out_features, kernel, FLOAT_KERNELS)
        weight = linear.weight.detach().to(torch.float32).numpy()
        self.sparse = pack(weight, block if kernel == "xt" else None)
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().to(torch.float32).numpy().copy()
        self._zero_bias = np.zeros(self.out_features, dtype=np.float32)

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = self._flat(x)
        if self.kernel == "rows":
            y = _rows(self.sparse, x2, self._zero_bias if self.bias is None else self.bias)
        else:
            y = _transpose(_xt(self.sparse, _transpose(x2)), self.bias)
        return torch.from_numpy(y).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, "
            f"sparsity={self.sparse.sparsity:.1%}, blocks={self.sparse.blocks}"
        )


def _gelu(a: np.ndarray) -> None:
    """The exact-erf GELU in place on a C-ordered float32 array (kernels.gelu), split over threads."""
    flat = a.reshape(-1)
    cuts = threads.even_splits(flat.size, threads.chunks(flat.size * 8))
    threads.run(kernels.gelu, [(flat, cuts[c], cuts[c + 1]) for c in range(len(cuts) - 1)])


# Elementwise activations the transposed layout can pass through unchanged (see SparseLinearChain).
CHAIN_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh)


class SparseLinearChain(_RuntimeLayer):
    """``second(act(first(x)))`` for two ``xt`` :class:`SparseLinear` layers around an elementwise
    activation, with the activations kept transposed in between: ``first``'s output transpose and
    ``second``'s input transpose (two passes over a P x hidden array) are skipped, ``first``'s bias is added
    in the transposed layout and ``act`` runs on it there. Made by :func:`prunekit.runtime.compile` for
    ``nn.Sequential`` runs Linear -> activation -> Linear; same output within float32 rounding."""

    kernel = "xt-chain"

    def __init__(self, first: SparseLinear, act: nn.Module, second: SparseLinear) -> None:
        super().__init__()
        if first.kernel != "xt" or second.kernel != "xt" or first.out_features != second.in_features:
            raise PrunekitError("SparseLinearChain needs two xt SparseLinear layers whose sizes chain")
        if not isinstance(act, CHAIN_ACTIVATIONS):
            raise PrunekitError(f"SparseLinearChain cannot keep the transposed layout across {type(act)}")
        self.first, self.act, self.second = first, act, second
        # the exact-erf GELU runs on our own vectorised kernel (erf within 3e-7), in place
        self._gelu = type(act) is nn.GELU and act.approximate == "none"

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = self.first._flat(x)
        hT = _xt(self.first.sparse, _transpose(x2), self.first.bias)  # (hidden, P)
        if self._gelu:
            _gelu(hT)
        else:
            hT = self._array(self.act(torch.from_numpy(hT)))
        y = _transpose(_xt(self.second.sparse, hT), self.second.bias)
        return torch.from_numpy(y).reshape(*lead, self.second.out_features)


def int8_exact(q: np.ndarray) -> bool:
    """True when float32 accumulation of int8 x int8 products is exact for every row of ``q``."""
    return int8_row_bound(q) < FLOAT32_EXACT


class _QuantizedBase:
    """Quantize activations and finish exactly like ``prunekit.quant.layers`` (see its module docstring)."""

    def _init_int8(self, module: nn.Module, block: int | None) -> None:
        q = module.weight_q.detach().reshape(module.weight_q.shape[0], -1).numpy()
        if not int8_exact(q):
            raise PrunekitError(
                f"{type(self).__name__}: a weight row's int8 sums can exceed 2**24 "
                f"(bound {int8_row_bound(q)}) (float32 sums would round): keep the reference module"
            )
        self.sparse = pack(q, block if self.kernel.startswith("xt") else None)
        self.dense_q = torch.from_numpy(q.astype(np.float32)) if self.kernel == "dense" else None
        self.weight_scale = module.weight_scale.detach().to(torch.float32).numpy().copy()
        self.act_scale = None if module.act_scale is None else np.float32(module.act_scale.item())
        bias = module.bias
        self.bias = (
            np.zeros(0, np.float32) if bias is None else bias.detach().to(torch.float32).numpy().copy()
        )
        self.has_bias = bias is not None
        # the integer output form (prunekit.quant.layers): requantized at out_scale
        self.out_scale = None if module.out_scale is None else np.float32(module.out_scale.item())
        if self.out_scale is not None:
            self.bias_q = module.bias_q.numpy().astype(np.int64)
            self.out_mult = module.out_mult.numpy().astype(np.int64)
            self.out_shift = module.out_shift.numpy().astype(np.int64)
            self.out_range = tuple(int(v) for v in module.out_range)

    def _quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.float32]:
        flat = x.reshape(-1)
        # numba hands a float32 result back as a Python float: make it float32 again, or the division below
        # would run in float64 and round ties differently from the reference
        s_x = np.float32(kernels.dynamic_scale(flat) if self.act_scale is None else self.act_scale)
        xq = np.empty_like(x)
        kernels.quantize_into(flat, s_x, xq.reshape(-1))
        return xq, s_x

    def _finish(self, acc: np.ndarray, s_x: np.float32) -> np.ndarray:
        """``acc``: (N, out, L) view, any strides; returns a C-ordered (N, out, L) float32 array."""
        y = np.empty(acc.shape, dtype=np.float32)
        if self.out_scale is not None:
            lo, hi = self.out_range
            kernels.finish_int8_requant(
                acc, self.bias_q, self.out_mult, self.out_shift, lo, hi, self.out_scale, y
            )
        else:
            kernels.finish_int8(acc, s_x, self.weight_scale, self.bias, self.has_bias, y)
        return y


class SparseQuantizedLinear(_LinearBase, _QuantizedBase):
    """``prunekit.quant.layers.QuantizedLinear`` on the sparse int8 kernels; bit-identical output."""

    def __init__(self, module: nn.Module, kernel: str = "rows", block: int | None = None) -> None:
        super().__init__(module.in_features, module.out_features, kernel, INT8_KERNELS)
        self._init_int8(module, block)
        self._zero = np.zeros(self.out_features, dtype=np.float32)

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = self._flat(x)
        xq, s_x = self._quantize(x2)
        if self.kernel == "rows":
            acc = _rows(self.sparse, xq, self._zero)[:, :, None]
        elif self.kernel == "xt":
            acc = _xt(self.sparse, _transpose(xq)).T[:, :, None]
        else:
            acc = torch.nn.functional.linear(torch.from_numpy(xq), self.dense_q).numpy()[:, :, None]
        return torch.from_numpy(self._finish(acc, s_x)).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.act_scale is None else "static"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, "
            f"sparsity={self.sparse.sparsity:.1%}, activations={mode}"
        )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_supported(conv: nn.Module) -> str | None:
    """Why a convolution stays dense (None when it can be lowered to one sparse GEMM)."""
    if getattr(conv, "groups", 1) != 1:
        return "grouped/depthwise conv"
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return f"padding_mode '{conv.padding_mode}'"
    if isinstance(conv.padding, str):
        return f"padding '{conv.padding}'"
    return None


class _ConvBase(_RuntimeLayer):
    def _init_conv(self, conv: nn.Module, kernel: str, allowed: tuple[str, ...]) -> None:
        reason = conv_supported(conv)
        if reason is not None:
            raise PrunekitError(f"{type(self).__name__} cannot lower a {reason}; keep it dense")
        if kernel not in allowed:
            raise PrunekitError(
                f"unknown kernel '{kernel}' for {type(self).__name__}; allowed: {', '.join(allowed)}"
            )
        self.kernel = kernel
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = _pair(conv.kernel_size), _pair(conv.stride)
        self.padding, self.dilation = _pair(conv.padding), _pair(conv.dilation)
        self.pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _batched(self, x: Tensor) -> tuple[Tensor, bool]:
        self._check(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise PrunekitError(
                f"{type(self).__name__} expects inputs (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return (x if x.dim() == 4 else x.unsqueeze(0)), x.dim() == 3

    def _cols(self, x: Tensor) -> tuple[np.ndarray, int, int, int]:
        """The GEMM's columns, plus N, Hout, Wout: ``(N, K, L)`` for the ``xt-nchw`` kernel, else ``(K, N*L)``
        (all images side by side: more columns per tile, at the price of permuted copies)."""
        n = x.shape[0]
        ho, wo = self._out_hw(x.shape[2], x.shape[3])
        if self.pointwise:  # 1x1: the (strided) input is already the column matrix
            xs = x[:, :, :: self.stride[0], :: self.stride[1]]
            cols = xs.reshape(n, self.in_channels, ho * wo)
        else:
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        if self.kernel == "xt" or (self.kernel == "dense" and n == 1):
            cols = cols[0] if n == 1 else cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
        return cols.contiguous().numpy(), n, ho, wo

    def _product(self, cols: np.ndarray, n: int, hw: int) -> np.ndarray:
        """``W @ cols`` as an ``(N, out, L)`` array (a strided view for the ``xt`` kernel)."""
        if self.kernel == "xt-nchw":
            return _xt_images(self.sparse, cols)
        if self.kernel == "xt":
            return _xt(self.sparse, cols).reshape(self.out_channels, n, hw).transpose(1, 0, 2)
        acc = torch.matmul(self.dense_q, torch.from_numpy(cols)).numpy()  # int8 "dense": exact float32 GEMM
        return acc.reshape(self.out_channels, n, hw).transpose(1, 0, 2) if acc.ndim == 2 else acc

    def _unbatch(self, y: Tensor, squeeze: bool) -> Tensor:
        return y.squeeze(0) if squeeze else y


class SparseConv2d(_ConvBase):
    """``nn.Conv2d`` (groups=1, zero padding) as a sparse GEMM over im2col columns (``xt``, ``xt-nchw``), or,
    with ``kernel="direct"``, as a direct sparse convolution (Park et al. 2017, "Faster CNNs with Direct
    Sparse Convolutions and Guided Pruning"): no im2col, the input zero-padded once per call and each
    nonzero of the CSR (over output channels) read as an offset into it (:func:`kernels.direct_conv`)."""

    def __init__(self, conv: nn.Conv2d, kernel: str = "xt", block: int | None = None) -> None:
        super().__init__()
        self._init_conv(conv, kernel, ("xt", "xt-nchw", "direct"))
        weight = conv.weight.detach().to(torch.float32).reshape(conv.out_channels, -1).numpy()
        self.sparse = pack(weight, None if kernel == "direct" else block)
        self.bias = None if conv.bias is None else conv.bias.detach().to(torch.float32).clone()
        if kernel == "direct":
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            col = self.sparse.idx.astype(np.uint64)
            chan, tap = col // np.uint64(kh * kw), col % np.uint64(kh * kw)
            taps = np.stack([chan, tap // np.uint64(kw) * np.uint64(dh), tap % np.uint64(kw) * np.uint64(dw)])
            self._taps = np.ascontiguousarray(taps)
            self._indptr = np.ascontiguousarray(self.sparse.indptr[0])
            self._bias_np = _NO_BIAS if self.bias is None else self.bias.numpy()
            self._geom: dict[tuple[int, int], np.ndarray] = {}  # per input (H, W)

    def _direct_forward(self, x: Tensor) -> Tensor:
        squeeze = x.dim() == 3
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        a = x.numpy()
        if squeeze:
            a = a[None]
        geom = self._geom.get(a.shape[2:])
        if geom is None:
            ho, wo = self._out_hw(a.shape[2], a.shape[3])
            geom = np.array([*self.padding, *self.stride, ho, wo, self.bias is not None], dtype=np.int64)
            self._geom[a.shape[2:]] = geom
        y = torch.from_numpy(
            kernels.direct_conv(a, self._indptr, self._taps, self.sparse.vals, self._bias_np, geom)
        )
        return y[0] if squeeze else y

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "direct":
            self._check(x)
            if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
                self._batched(x)  # raises the shape error
            return self._direct_forward(x)
        x, squeeze = self._batched(x)
        cols, n, ho, wo = self._cols(x.to(torch.float32))
        y = torch.from_numpy(self._product(cols, n, ho * wo))
        if self.bias is not None:
            y = y + self.bias[None, :, None]
        return self._unbatch(y.reshape(n, self.out_channels, ho, wo).contiguous(), squeeze)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, kernel={self.kernel}, sparsity={self.sparse.sparsity:.1%}"
        )


class SparseQuantizedConv2d(_ConvBase, _QuantizedBase):
    """``prunekit.quant.layers.QuantizedConv2d`` on the sparse int8 kernels; bit-identical output."""

    def __init__(self, module: nn.Module, kernel: str = "xt", block: int | None = None) -> None:
        super().__init__()
        self._init_conv(module, kernel, ("xt", "xt-nchw", "dense"))
        self._init_int8(module, block)

    def forward(self, x: Tensor) -> Tensor:
        x, squeeze = self._batched(x)
        xq, s_x = self._quantize(self._array(x))
        cols, n, ho, wo = self._cols(torch.from_numpy(xq))
        y = torch.from_numpy(self._finish(self._product(cols, n, ho * wo), s_x))
        return self._unbatch(y.reshape(n, self.out_channels, ho, wo), squeeze)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.act_scale is None else "static"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, kernel={self.kernel}, sparsity={self.sparse.sparsity:.1%}, "
            f"activations={mode}"
        )


def default_block(in_features: int, columns: int) -> int | None:
    """Column-block width proposed for the ``xt`` kernel (None: no blocking). While every output row streams
    over the active slice of ``xT`` (block x tile columns x 4 bytes), that slice should stay in cache:
    measured best here at about 64 KiB for 64-column tiles and 16 KiB for 8-column tiles (compile still
    times the unblocked kernel too)."""
    block = 256 if columns >= 64 else 512
    return None if block >= in_features else block


class FastQuantizedAdd(_RuntimeLayer):
    """``prunekit.quant.glue.QuantizedAdd`` as one numba pass (:func:`kernels.int8_add`); bit-identical."""

    kernel = "int8-add"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.scales = module.scales.detach().to(torch.float32).numpy().copy()
        self.consts = module.consts.detach().to(torch.int64).numpy().copy()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        self._check(a)
        if a.shape != b.shape:
            raise PrunekitError(f"{type(self).__name__}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        xa, xb = self._array(a), self._array(b)
        out = np.empty_like(xa)
        kernels.int8_add(xa.reshape(-1), xb.reshape(-1), self.scales, self.consts, out.reshape(-1))
        return torch.from_numpy(out)


class FastQuantizeInput(_RuntimeLayer):
    """``prunekit.quant.glue.QuantizeInput`` as one numba pass (:func:`kernels.quantize_dequantize`)."""

    kernel = "int8-quantize"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.scale = np.float32(module.scale.item())

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        a = self._array(x)
        out = np.empty_like(a)
        kernels.quantize_dequantize(a.reshape(-1), self.scale, out.reshape(-1))
        return torch.from_numpy(out)


def fast_glue(module: nn.Module) -> nn.Module | None:
    """The runtime twin of an integer operator of prunekit.quant.glue (None: it stays as it is)."""
    if type(module) is QuantizedAdd:
        return FastQuantizedAdd(module)
    if type(module) is QuantizeInput:
        return FastQuantizeInput(module)
    return None
