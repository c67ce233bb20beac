"""Read an integer INT8 prunekit model (:func:`prunekit.quant.graph.integerize`) as a flat list of
operators with their modules and shapes: the C export computes exactly what these modules compute, so it
takes every scale and constant from them and chooses none of its own.

Anything outside the integer graph (a float layer, a float operator, an int8 layer without an integer
output) is a one-line :class:`PrunekitError` naming the operator and its module path, and a model that is
not an integer model is told how to make one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from prunekit.errors import PrunekitError
from prunekit.quant.glue import (
    QuantizedAdd,
    QuantizedAvgPool2d,
    QuantizedClamp,
    QuantizedGlobalAvgPool,
    QuantizedHardswish,
    QuantizeInput,
)
from prunekit.quant.graph import SUPPORTED, classify, integer_plan, trace, where
from prunekit.quant.layers import QuantizedLayer

QUANTIZE_HINT = (
    "quantize it with static activations and the classifier included: a recipe stage "
    "`{type: quantize, activations: static, classifier: true}`, or "
    "prunekit.quant.ptq.quantize(model, calibration=batches, classifier=True)"
)
_GLUE_KINDS = {
    QuantizeInput: "quantize",
    QuantizedAdd: "add",
    QuantizedAvgPool2d: "avgpool",
    QuantizedGlobalAvgPool: "gap",
    QuantizedClamp: "relu6",
    QuantizedHardswish: "hardswish",
}


@dataclass
class Node:
    """One operator; ``shape`` is its output shape without the batch dimension."""

    name: str
    kind: str  # input, quantize, conv, add, relu, relu6, hardswish, maxpool, avgpool, gap, flatten
    inputs: list[str]
    shape: tuple[int, ...]
    path: str  # module path (or fx node name) for messages
    module: nn.Module | None = None
    attrs: dict[str, Any] | None = None


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


def _refuse(node: fx.Node, module: nn.Module | None) -> PrunekitError:
    path = where(node)
    if isinstance(module, QuantizedLayer):
        return PrunekitError(
            f"int8 layer '{path}' hands its output to float code, which the C export cannot run: "
            f"{QUANTIZE_HINT}"
        )
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return PrunekitError(
            f"layer '{path}' ({type(module).__name__}) is float32; the C export needs every Linear/Conv2d "
            f"int8 (the classifier stays float unless classifier is true): {QUANTIZE_HINT}"
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return PrunekitError(
            f"BatchNorm '{path}' is not folded (its convolution stays float or it does not follow one); "
            f"the C export needs it folded into an int8 convolution: {QUANTIZE_HINT}"
        )
    what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
    return PrunekitError(
        f"unsupported operator {what} at '{path}' for the C export (it runs in float in the int8 model); "
        f"supported: {SUPPORTED}"
    )


@torch.no_grad()
def capture(model: nn.Module, example: Tensor) -> Graph:
    """The operators of the integer ``model`` with their output shapes (from ``example[:1]``)."""
    model = model.eval()
    if integer_plan(model) is None:
        if not any(isinstance(m, QuantizedLayer) for m in model.modules()):
            raise PrunekitError(
                f"the model is not quantized (no int8 layer); the C export needs INT8: {QUANTIZE_HINT}"
            )
        raise PrunekitError(
            "the model is not an integer INT8 model (int8 layers with float outputs: dynamic activations, "
            f"a model torch.fx cannot trace, or a file written before prunekit's one INT8 arithmetic): "
            f"{QUANTIZE_HINT}"
        )
    try:
        gm = trace(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PrunekitError(f"cannot trace the model with torch.fx for the C export: {first}") from None
    kinds = classify(gm)
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
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        inputs = [rename.get(a.name, a.name) for a in kinds[node].inputs]
        kind = _GLUE_KINDS.get(type(module), kinds[node].kind)
        if kind == "int8":
            readers = [u for u in node.users if u.op != "output"]
            if module.integer_output and module.wide and readers:  # read by float code: name it
                u = readers[0]
                raise _refuse(u, gm.get_submodule(u.target) if u.op == "call_module" else None)
            if not module.integer_output:
                raise _refuse(node, module)
            kind = "conv"
        elif kind == "identity":
            rename[node.name] = inputs[0]
            continue
        elif kind not in (
            "quantize",
            "add",
            "avgpool",
            "gap",
            "relu6",
            "hardswish",
            "relu",
            "maxpool",
            "flatten",
        ):
            raise _refuse(node, module)
        nodes.append(Node(node.name, kind, inputs, (), where(node), module, kinds[node].attrs))
    _shapes(gm, nodes, example[:1].to(torch.float32))
    if nodes[1:] and nodes[1].kind != "quantize":
        raise PrunekitError("the C export needs the model's input rounded to int8 first (an integer model)")
    return Graph(nodes, output)


def _shapes(gm: fx.GraphModule, nodes: list[Node], x: Tensor) -> None:
    by_name = {n.name: n for n in nodes}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in by_name and isinstance(result, Tensor):
                by_name[n.name].shape = tuple(result.shape[1:])
            return result

    Recorder(gm).run(x)
    for n in nodes:
        if n.kind == "conv" and len(n.shape) not in (1, 3):
            raise PrunekitError(f"layer '{n.path}': the C export takes 2-D images (N, C, H, W) or vectors")
