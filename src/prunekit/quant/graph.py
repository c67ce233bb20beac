"""The integer model: one INT8 arithmetic from the model's input to its output.

:func:`integerize` turns a model whose int8 layers have static activations (and that ``torch.fx`` can
trace) into one in which every tensor between int8 operators is an int8 tensor with a static scale,
carried as its dequantized value ``float32(q) * s``. The model stays the same object with the same
submodules; it gains ``int8_ops`` (the integer operators) and runs its traced forward with them:

- a float input read by integer operators is rounded once, at its scale (:class:`QuantizeInput`);
- each int8 layer requantizes its accumulator to the scale of the tensor it writes (the fixed-point rule
  of :mod:`prunekit.quant.rounding`), int8, or int32 at a 65536th of the calibrated scale where its output
  is the model's output or is read by float code (a float layer, an unsupported operator);
- adds, average pools, ReLU6 and Hardswish between int8 tensors become integer operators
  (:mod:`prunekit.quant.glue`); ReLU, max pooling, flatten and identities stay what they are: on an int8
  tensor they give an int8 tensor on the same grid, exactly.

So the PyTorch model computes exactly the integers the C export, the runtime's int8 kernels and (within
onnxruntime's float rounding) the QDQ ONNX file compute: the C export and the ONNX export read their
scales and constants off these modules instead of choosing their own.

**Where float stays**: float layers (the classifier by default: ``classifier=True`` makes it int8),
operators outside the list above (LayerNorm, GELU, attention, ...), and everything after them until the
next int8 layer, which rounds its float input like any float input. An int8 layer that hands its output
to float code writes the int32 form, nearly exact. A model that does not trace, or has dynamic
activations, keeps int8 layers with float outputs (``y = float32(acc) * (s_x * s_w) + bias``).

**Scales**: tensors joined by ReLU, ReLU6, max pooling, flatten or an identity share one scale. A group
read by int8 layers takes the largest of their calibrated input scales (they read the same values, so
these are equal unless a ReLU sits in between) and those layers use it; any other group takes
``max|x| / 127`` of the values its readers see over the calibration batches, measured on the int8 model.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from prunekit.errors import PrunekitError
from prunekit.quant.fold import FoldedBatchNorm
from prunekit.quant.glue import (
    GLUE,
    QuantizedAdd,
    QuantizedAvgPool2d,
    QuantizedClamp,
    QuantizedGlobalAvgPool,
    QuantizedHardswish,
    QuantizeInput,
)
from prunekit.quant.layers import QuantizedLayer
from prunekit.quant.rounding import WIDE, activation_scale

log = logging.getLogger(__name__)

OPS = "int8_ops"  # the submodule holding the integer operators integerize adds
TRANSPARENT = ("identity", "relu", "maxpool", "flatten")
SAME_SCALE = (*TRANSPARENT, "relu6")  # output on its input's grid (ReLU6 clamps at round(6 / s))
INTEGER_OPS = ("add", "avgpool", "gap", "relu6", "hardswish")
SUPPORTED = (
    "int8 Linear/Conv2d, ReLU, ReLU6, Hardswish, add, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1) / "
    "mean over (2, 3), flatten(1), Identity, Dropout"
)


class Tracer(fx.Tracer):
    """int8 layers, folded BatchNorms and integer operators are leaves (their forward is not traced)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantizedLayer, FoldedBatchNorm, *GLUE)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a GraphModule whose children are the model's own submodules (the same objects: what
    a rewrite changes in a layer, it changes in the model). Raises what fx raises."""
    graph = Tracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for name, child in model.named_children():
        setattr(gm, name, child)
    return gm


def _install(model: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """Make ``model`` run the rewritten graph, keeping it the model it is (its class, its submodules,
    ``model.stem[0]`` still an ``nn.Sequential``'s item): the integer operators become its ``int8_ops``
    submodule and its class a private subclass whose ``forward`` is the graph's code, run with ``self`` the
    model, so a submodule replaced later (``prunekit.runtime.compile``) is the one that runs."""
    model.add_module(OPS, gm.get_submodule(OPS))
    base = type(model)
    body = {"forward": type(gm).forward, "__module__": base.__module__, "__qualname__": base.__qualname__}
    model.__class__ = type(base.__name__, (base,), body)
    return model


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class Kind:
    """What an fx node is for the integer graph: ``kind`` in input, output, int8, the TRANSPARENT and
    INTEGER_OPS kinds, or float (anything else); ``inputs``: its tensor arguments."""

    kind: str
    inputs: list[fx.Node] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


def _module_kind(m: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(m, QuantizedLayer):
        return "int8", {}
    if isinstance(m, (nn.Identity, nn.Dropout)):  # FoldedBatchNorm is an Identity
        return "identity", {}
    if isinstance(m, nn.ReLU):
        return "relu", {}
    if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
        return "relu6", {}
    if isinstance(m, nn.Hardswish):
        return "hardswish", {}
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return "flatten", {}
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
        return "gap", {"keepdim": True}
    if isinstance(m, nn.MaxPool2d) and not (m.ceil_mode or m.return_indices) and _pair(m.dilation) == (1, 1):
        return "maxpool", {}
    if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.count_include_pad and m.divisor_override is None:
        stride = m.stride if m.stride is not None else m.kernel_size
        return "avgpool", {
            "kernel": _pair(m.kernel_size),
            "stride": _pair(stride),
            "padding": _pair(m.padding),
        }
    return "float", {}


_ADD = (operator.add, operator.iadd, torch.add)
_RELU = (F.relu, torch.relu)


def _dims(node: fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _call_kind(node: fx.Node) -> tuple[str, dict[str, Any]]:
    """The kind of a call_function / call_method node (forms the C export supports; else float)."""
    target, args, kwargs = node.target, node.args, node.kwargs
    tensors = [a for a in args if isinstance(a, fx.Node)]
    method = node.op == "call_method"
    if (target in _ADD or (method and target == "add")) and len(args) == 2 and len(tensors) == 2:
        return ("add", {}) if not kwargs else ("float", {})
    one = len(tensors) == 1 and isinstance(args[0], fx.Node)
    if not one:
        return "float", {}
    if target in _RELU or (method and target == "relu"):
        return ("relu", {}) if len(args) == 1 and set(kwargs) <= {"inplace"} else ("float", {})
    if target is F.relu6 and len(args) == 1 and set(kwargs) <= {"inplace"}:
        return "relu6", {}
    if target is F.hardswish and len(args) == 1 and set(kwargs) <= {"inplace"}:
        return "hardswish", {}
    if target is torch.flatten or (method and target == "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return ("flatten", {}) if (start, end) == (1, -1) else ("float", {})
    if target is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return ("gap", {"keepdim": True}) if _pair(size) == (1, 1) else ("float", {})
    if target is torch.mean or (method and target == "mean"):
        dims = _dims(node)
        extra = set(kwargs) - {"dim", "keepdim"} or len(args) > 3
        if not extra and isinstance(dims, (tuple, list)) and sorted(int(d) % 4 for d in dims) == [2, 3]:
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return "gap", {"keepdim": bool(keep), "dims": tuple(dims)}
    return "float", {}


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's tensor arguments in order, repeats kept (``x + x`` has two)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def classify(gm: fx.GraphModule) -> dict[fx.Node, Kind]:
    out = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind, attrs = "input", {}
        elif node.op == "output":
            kind, attrs = "output", {}
        elif node.op == "call_module":
            kind, attrs = _module_kind(gm.get_submodule(node.target))
        elif node.op in ("call_function", "call_method"):
            kind, attrs = _call_kind(node)
        else:
            kind, attrs = "float", {}
        out[node] = Kind(kind, _tensor_args(node), attrs)
    return out


def where(node: fx.Node) -> str:
    """The module path of a node, for messages and reports."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack), "") if stack else ""
    return f"{path}.{node.name}" if path else node.name


def _graph_outputs(gm: fx.GraphModule) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            fx.node.map_arg(node.args, lambda n: found.add(n))
    return found


@dataclass
class Structure:
    """The integer graph's shape: which sources write int8 (int8 layers; inputs rounded once) and which
    nodes carry int8 tensors. A function of the traced graph alone (and of which inputs are float), so
    a saved model's skeleton is rebuilt without data."""

    kinds: dict[fx.Node, Kind]
    int8_source: dict[fx.Node, bool]  # int8 layers and float inputs: writes an int8 tensor
    is_int: dict[fx.Node, bool]


def decide(gm: fx.GraphModule, kinds: dict[fx.Node, Kind], float_inputs: set[str]) -> Structure:
    outputs = _graph_outputs(gm)
    source = {
        n: (k.kind == "int8") or (k.kind == "input" and n.name in float_inputs)
        for n, k in kinds.items()
        if k.kind in ("int8", "input")
    }
    while True:
        is_int: dict[fx.Node, bool] = {}
        for n, k in kinds.items():
            if k.kind in ("int8", "input"):
                is_int[n] = source[n]
            elif k.kind in TRANSPARENT:
                is_int[n] = bool(k.inputs) and is_int[k.inputs[0]]
            elif k.kind in INTEGER_OPS:
                is_int[n] = bool(k.inputs) and all(is_int[i] for i in k.inputs)
            else:
                is_int[n] = False

        def accepts(user: fx.Node, is_int: dict[fx.Node, bool] = is_int) -> bool:
            u = kinds[user].kind
            return u == "int8" or u in TRANSPARENT or (u in INTEGER_OPS and is_int[user])

        changed = False
        for n, writes_int in source.items():
            if writes_int and (n in outputs or not all(accepts(u) for u in n.users)):
                source[n] = False
                changed = True
        if not changed:
            return Structure(kinds, source, is_int)


def _groups(st: Structure) -> dict[fx.Node, fx.Node]:
    """Each int8 tensor's group representative: tensors joined by transparent operators share a scale."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    for n, k in st.kinds.items():
        if st.is_int[n]:
            parent.setdefault(n, n)
            if k.kind in SAME_SCALE:
                parent[find(n)] = find(k.inputs[0])
    return {n: find(n) for n in parent}


def assign_scales(
    gm: fx.GraphModule, st: Structure, tops: dict[str, float]
) -> tuple[dict[fx.Node, float], dict[fx.Node, float]]:
    """``(scale of every int8 tensor, scale of every wide int8 layer output)``; int8 layers reading an
    int8 tensor get its group's scale as their ``act_scale`` (module docstring)."""
    group = _groups(st)
    members: dict[fx.Node, list[fx.Node]] = {}
    for n, g in group.items():
        members.setdefault(g, []).append(n)
    outputs = _graph_outputs(gm)
    scale: dict[fx.Node, float] = {}
    for nodes in members.values():
        readers = [u for n in nodes for u in n.users if st.kinds[u].kind == "int8"]
        if readers:
            s = max(float(gm.get_submodule(u.target).act_scale) for u in readers)
        else:
            used = [
                n for n in nodes if n in outputs or any(st.kinds[u].kind not in TRANSPARENT for u in n.users)
            ] or nodes
            top = max(tops.get(n.name, 0.0) for n in used)
            s = float(activation_scale(torch.tensor(top, dtype=torch.float32)))
        for u in readers:
            gm.get_submodule(u.target).act_scale = torch.tensor(s, dtype=torch.float32)
        for n in nodes:
            scale[n] = s
    wide = {}
    for n, writes_int in st.int8_source.items():
        if st.kinds[n].kind == "int8" and not writes_int:
            top = torch.tensor(tops.get(n.name, 0.0), dtype=torch.float32)
            wide[n] = float(activation_scale(top)) / WIDE
    return scale, wide


def _new_op(st: Structure, n: fx.Node, scale: dict[fx.Node, float] | None) -> nn.Module:
    k = st.kinds[n]

    def s(node: fx.Node) -> float:
        return 1.0 if scale is None else scale[node]

    if k.kind == "add":
        return QuantizedAdd(s(k.inputs[0]), s(k.inputs[1]), s(n))
    if k.kind == "avgpool":
        a = k.attrs
        return QuantizedAvgPool2d(a["kernel"], a["stride"], a["padding"], s(k.inputs[0]), s(n))
    if k.kind == "gap":
        return QuantizedGlobalAvgPool(k.attrs["keepdim"], s(k.inputs[0]), s(n))
    if k.kind == "relu6":
        return QuantizedClamp(s(n))
    if k.kind == "hardswish":
        return QuantizedHardswish(s(k.inputs[0]), s(n))
    raise AssertionError(k.kind)


class IntegerOps(nn.Module):
    """The container of the integer operators; ``plan`` is what :func:`rebuild` needs (saved with
    artifacts by :func:`prunekit.quant.ptq.int8_plan`)."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: dict[str, Any] = {"inputs": [], "ops": {}}


def rewrite(gm: fx.GraphModule, st: Structure, scale=None, wide=None) -> dict[str, Any]:
    """Insert the integer operators and set every int8 layer's output form, in place. ``scale``/``wide``
    None: a skeleton (values to come from a state dict). Returns the plan entry that rebuilds it."""
    graph = gm.graph
    gm.add_module(OPS, IntegerOps())
    ops: dict[str, str] = {}
    inputs = []
    for n in list(graph.nodes):
        k = st.kinds[n]
        if k.kind == "input" and st.int8_source[n]:
            name = f"{OPS}.{n.name}"
            gm.add_submodule(name, QuantizeInput(1.0 if scale is None else scale[n]))
            with graph.inserting_after(n):
                q = graph.call_module(name, (n,))
            n.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
            ops[name] = "QuantizeInput"
            inputs.append(n.name)
        elif k.kind == "int8":
            layer = gm.get_submodule(n.target)
            if scale is None:
                layer.output_skeleton(wide=not st.int8_source[n])
            elif st.int8_source[n]:
                layer.set_output(scale[n])
            else:
                layer.set_output(wide[n], wide=True)
        elif k.kind in INTEGER_OPS and st.is_int[n]:
            name = f"{OPS}.{n.name}"
            module = _new_op(st, n, scale)
            gm.add_submodule(name, module)
            with graph.inserting_before(n):
                new = graph.call_module(name, tuple(_tensor_args(n)))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            graph.erase_node(n)
            ops[name] = type(module).__name__
    graph.lint()
    gm.recompile()
    gm.get_submodule(OPS).plan = {"inputs": inputs, "ops": ops}
    return {"inputs": inputs, "ops": ops}


@dataclass
class Measured:
    tops: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    float_inputs: set[str]


@torch.no_grad()
def measure(gm: fx.GraphModule, batches: list[Tensor]) -> Measured:
    """Largest |value| and shape (batch 1 dropped) of every node's tensor over ``batches``."""
    tops: dict[str, float] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    floats: set[str] = set()

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, Tensor):
                # recorded now: an in-place ReLU later changes this tensor
                top = float(result.detach().abs().amax().float()) if result.numel() else 0.0
                tops[n.name] = max(tops.get(n.name, 0.0), top)
                shapes[n.name] = tuple(result.shape[1:])
                if n.op == "placeholder" and result.is_floating_point():
                    floats.add(n.name)
            return result

    recorder = Recorder(gm)
    for x in batches:
        recorder.run(x)
    return Measured(tops, shapes, floats)


@dataclass
class Integerized:
    model: nn.Module
    integer: bool
    reason: str = ""
    plan: dict[str, Any] | None = None


def integerize(model: nn.Module, batches: list[Tensor]) -> Integerized:
    """The integer model of a converted int8 ``model`` (static activations), calibrated on ``batches``
    (module docstring); the model itself is returned unchanged, with the reason, when it cannot be."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    if not layers:
        return Integerized(model, False, "no int8 layer")
    if any(m.act_scale is None for m in layers):
        return Integerized(model, False, "dynamic activations (no static scales to requantize to)")
    try:
        gm = trace(model)
    except Exception as exc:  # fx raises many types for untraceable code: the model keeps float outputs
        first = (str(exc).strip().splitlines() or [""])[0]
        reason = f"the model does not trace with torch.fx ({type(exc).__name__}: {first[:200]})"
        log.info("int8: %s; its int8 layers keep float outputs", reason)
        return Integerized(model, False, reason)
    measured = measure(gm.eval(), batches)
    st = decide(gm, classify(gm), measured.float_inputs)
    scale, wide = assign_scales(gm, st, measured.tops)
    plan = rewrite(gm, st, scale, wide)
    return Integerized(_install(model, gm).eval(), True, "", plan)


def rebuild(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """The integer skeleton of a freshly built int8 ``model`` (its layers already int8), as ``plan`` (from
    :func:`integerize`) describes it; values come from a state dict."""
    try:
        gm = trace(model)
    except Exception as exc:
        raise PrunekitError(
            f"the saved integer int8 model needs a torch.fx trace of the model: {exc}"
        ) from None
    st = decide(gm, classify(gm), set(plan.get("inputs", [])))
    got = rewrite(gm, st)
    if got["ops"] != plan.get("ops", {}) or got["inputs"] != plan.get("inputs", []):
        raise PrunekitError(
            "the saved integer int8 model does not match this model's forward: its integer operators "
            f"{sorted(plan.get('ops', {}))}, rebuilt {sorted(got['ops'])}"
        )
    return _install(model, gm).eval()


def integer_plan(model: nn.Module) -> dict[str, Any] | None:
    """The plan of a model :func:`integerize` made (or :func:`rebuild` rebuilt), else None."""
    ops = getattr(model, OPS, None)
    return dict(ops.plan) if isinstance(ops, IntegerOps) else None
