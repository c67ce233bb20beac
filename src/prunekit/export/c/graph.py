"""Capture an INT8 prunekit model as a flat graph of the operators the C export supports.

The model is traced once with ``torch.fx`` (int8 layers and standard ``torch.nn`` modules are leaves),
shapes come from one batch-1 example, and every node's largest output magnitude over the calibration
inputs is recorded by running the int8 model itself (the scales of tensors no int8 layer quantizes come
from these, :mod:`prunekit.export.c.lower`). Identity-like modules (``nn.Identity``, ``nn.Dropout`` in
eval mode, a :class:`prunekit.quant.ptq.FoldedBatchNorm`) are dropped here.

Anything else is a one-line :class:`PrunekitError` naming the operator and its module path, and a model
with a float Linear/Conv2d or an unfolded BatchNorm is told how to quantize it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from prunekit.errors import PrunekitError
from prunekit.quant.layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from prunekit.quant.ptq import FoldedBatchNorm

SUPPORTED = (
    "QuantizedConv2d (incl. depthwise/grouped), QuantizedLinear, ReLU, ReLU6, Hardswish, add, "
    "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1) / mean over (2, 3), flatten(1), Identity, Dropout"
)
QUANTIZE_HINT = (
    "quantize it first with static activations and the classifier included: a recipe stage "
    "`{type: quantize, activations: static, classifier: true}`, or "
    "prunekit.quant.ptq.quantize(model, calibration=batches, classifier=True)"
)


@dataclass
class Node:
    """One operator of the captured graph; ``shape`` is its output shape without the batch dimension."""

    name: str
    kind: str  # input, conv, add, relu, relu6, hardswish, maxpool, avgpool, gap, flatten
    inputs: list[str]
    shape: tuple[int, ...]
    path: str  # module path (or fx node name) for messages
    attrs: dict[str, Any] = field(default_factory=dict)
    top: float = 0.0  # max |output| over the calibration inputs (float32)


@dataclass
class Graph:
    nodes: list[Node]  # topological order, nodes[0] is the input
    output: str

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantizedLayer, FoldedBatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _int_layer(m: QuantizedLayer, path: str) -> dict[str, Any]:
    if m.act_scale is None:
        raise PrunekitError(
            f"layer '{path}' has dynamic activations; the C export needs static (calibrated) ones: "
            f"{QUANTIZE_HINT}"
        )
    weight = m.weight_q.detach().cpu().numpy().astype(np.int8)
    attrs: dict[str, Any] = {
        "weight": weight.reshape(weight.shape[0], -1),
        "weight_scale": m.weight_scale.detach().cpu().numpy().astype(np.float32),
        "act_scale": float(m.act_scale.detach().cpu().to(torch.float32)),
        "bias": None if m.bias is None else m.bias.detach().cpu().numpy().astype(np.float32),
    }
    if isinstance(m, QuantizedConv2d):
        attrs.update(
            kernel=_pair(m.kernel_size),
            stride=_pair(m.stride),
            padding=_pair(m.padding),
            dilation=_pair(m.dilation),
            groups=int(m.groups),
        )
    else:
        attrs.update(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    return attrs


def _module_node(m: nn.Module, path: str) -> tuple[str, dict[str, Any]]:
    """(kind, attrs) of a leaf module, or a PrunekitError naming it."""
    kind = type(m).__name__
    if isinstance(m, (QuantizedConv2d, QuantizedLinear)):
        return "conv", _int_layer(m, path)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return "identity", {}
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
        return "relu6", {}
    if isinstance(m, nn.Hardswish):
        return "hardswish", {}
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise PrunekitError(f"'{path}' (Flatten): only start_dim=1, end_dim=-1 is supported")
        return "flatten", {}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise PrunekitError(f"'{path}' (AdaptiveAvgPool2d): only output_size 1 is supported")
        return "gap", {}
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if m.ceil_mode or (isinstance(m, nn.MaxPool2d) and (_pair(m.dilation) != (1, 1) or m.return_indices)):
            raise PrunekitError(
                f"'{path}' ({kind}): ceil_mode, dilation and return_indices are not supported"
            )
        if isinstance(m, nn.AvgPool2d) and (not m.count_include_pad or m.divisor_override is not None):
            raise PrunekitError(
                f"'{path}' (AvgPool2d): only count_include_pad=True without divisor_override is supported"
            )
        stride = m.stride if m.stride is not None else m.kernel_size
        attrs = {"kernel": _pair(m.kernel_size), "stride": _pair(stride), "padding": _pair(m.padding)}
        return ("maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool"), attrs
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        raise PrunekitError(
            f"layer '{path}' ({kind}) is float32; the C export needs every Linear/Conv2d int8 (the "
            f"classifier stays float unless classifier is true): {QUANTIZE_HINT}"
        )
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        raise PrunekitError(
            f"BatchNorm '{path}' is not folded (its convolution stays float or it does not follow one); "
            f"the C export needs it folded into an int8 convolution: {QUANTIZE_HINT}"
        )
    raise PrunekitError(f"unsupported operator {kind} at '{path}' for the C export; supported: {SUPPORTED}")


_FUNCTIONS = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.hardswish: "hardswish",
    torch.flatten: "flatten",
    F.adaptive_avg_pool2d: "gap",
    torch.mean: "gap",
}
_METHODS = {"add": "add", "relu": "relu", "flatten": "flatten", "mean": "gap"}


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack), "") if stack else ""
    return f"{path}.{node.name}" if path else node.name


def _check_call(node: fx.Node, kind: str) -> None:
    """The argument forms a function/method node may take (anything else: a one-line error)."""
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    ok = True
    if kind == "add":
        ok = len(tensors) == 2 and len(node.args) == 2 and not kwargs
    elif kind == "flatten":
        start = args[0] if args else kwargs.get("start_dim", 0)
        ok = start == 1 and (len(args) < 2 or args[1] == -1) and kwargs.get("end_dim", -1) == -1
    elif kind == "gap":
        if node.target is F.adaptive_avg_pool2d:
            ok = _pair(args[0] if args else kwargs.get("output_size")) == (1, 1)
        else:
            dims = args[0] if args else kwargs.get("dim")
            ok = isinstance(dims, (tuple, list)) and sorted(int(d) % 4 for d in dims) == [2, 3]
    else:
        ok = len(tensors) == 1 and not args  # relu / relu6 / hardswish (inplace= changes nothing here)
    if not ok:
        raise PrunekitError(
            f"unsupported form of {kind} at '{_where(node)}' for the C export: args {node.args[1:]}, "
            f"kwargs {node.kwargs}; supported: {SUPPORTED}"
        )


def trace(model: nn.Module) -> fx.GraphModule:
    if not any(isinstance(m, QuantizedLayer) for m in model.modules()):
        raise PrunekitError(
            f"the model is not quantized (no int8 layer); the C export needs INT8: {QUANTIZE_HINT}"
        )
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # a user's forward with Python control flow on values: one line, not a trace
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PrunekitError(
            f"cannot trace the model with torch.fx for the C export: {type(exc).__name__}: {first}"
        ) from None
    return fx.GraphModule(model, graph)


@torch.no_grad()
def capture(model: nn.Module, calibration: list[Tensor]) -> Graph:
    """The graph of the int8 ``model`` with shapes (from ``calibration[0][:1]``) and calibrated maxima."""
    model = model.eval()
    gm = trace(model)
    nodes: list[Node] = []
    rename: dict[str, str] = {}  # dropped identity nodes -> what they pass on
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if nodes:
                raise PrunekitError("the C export takes models with exactly one input tensor")
            nodes.append(Node(node.name, "input", [], (), "input"))
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise PrunekitError("the C export takes models that return one tensor")
            output = rename.get(out.name, out.name)
            continue
        if node.op == "call_module":
            kind, attrs = _module_node(gm.get_submodule(node.target), str(node.target))
            path = str(node.target)
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            kind, attrs, path = _FUNCTIONS[node.target], {}, _where(node)
            _check_call(node, kind)
        elif node.op == "call_method" and node.target in _METHODS:
            kind, attrs, path = _METHODS[node.target], {}, _where(node)
            _check_call(node, kind)
        else:
            what = getattr(node.target, "__name__", str(node.target))
            raise PrunekitError(
                f"unsupported operator {what} ({node.op}) at '{_where(node)}' for the C export; "
                f"supported: {SUPPORTED}"
            )
        inputs = [rename.get(a.name, a.name) for a in node.args if isinstance(a, fx.Node)]
        if kind == "identity":
            rename[node.name] = inputs[0]
            continue
        nodes.append(Node(node.name, kind, inputs, (), path, attrs))
    _measure(gm, nodes, rename, calibration)
    return Graph(nodes, output)


def _measure(gm: fx.GraphModule, nodes: list[Node], rename: dict[str, str], batches: list[Tensor]) -> None:
    """Shapes (batch 1) and max |value| of every kept node over ``batches``, run through the int8 model."""
    by_name = {n.name: n for n in nodes}
    tops: dict[str, float] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in by_name and isinstance(result, Tensor):
                # recorded now: an in-place ReLU later changes this tensor
                top = float(result.detach().abs().amax()) if result.numel() else 0.0
                tops[n.name] = max(tops.get(n.name, 0.0), top)
                shapes[n.name] = tuple(result.shape[1:])
            return result

    recorder = Recorder(gm)
    for x in batches:
        recorder.run(x.to(torch.float32))
    for n in nodes:
        n.top, n.shape = tops.get(n.name, 0.0), shapes.get(n.name, ())
        if n.kind in ("conv",) and len(n.shape) not in (1, 3):
            raise PrunekitError(f"layer '{n.path}': the C export takes 2-D images (N, C, H, W) or vectors")
    return None
