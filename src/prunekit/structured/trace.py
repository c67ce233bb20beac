"""An eager, concrete trace of one forward pass: every torch function call with its tensors.

Why this mechanism: torch.fx symbolic tracing fails on data-dependent control flow (most Hugging Face
models), torch.export is slow and strict about the same; the autograd graph loses non-differentiable ops
and views. Running the model once under a ``TorchFunctionMode`` records exactly the operations that
executed, with real shapes, for any model that can run on the example inputs. It is linear in the
number of operations executed and cannot hang on control flow (loops simply unroll).

Every tensor seen becomes a :class:`Value` (model input, parameter, buffer, activation or constant);
in-place operations produce a new Value for the same tensor object, so later uses see the new version.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


@dataclass(eq=False)
class Value:
    index: int
    shape: tuple[int, ...]
    kind: str  # "input" | "param" | "buffer" | "activation" | "const"
    name: str = ""  # parameter / buffer name
    producer: int | None = None  # index of the op that produced it

    def __repr__(self) -> str:
        label = self.name or f"v{self.index}"
        return f"<{self.kind} {label} {list(self.shape)}>"


@dataclass(eq=False)
class Op:
    index: int
    name: str  # the torch function's name: "conv2d", "add", "view", ...
    args: tuple  # arguments with tensors replaced by Values
    kwargs: dict[str, Any]
    outputs: list[Value]
    where: str = ""  # user source location, for error messages

    @cached_property
    def inputs(self) -> list[Value]:
        return _values((self.args, self.kwargs), [])

    @cached_property
    def values(self) -> list[Value]:
        """Inputs and outputs."""
        return [*self.inputs, *self.outputs]


SHAPE_READ_WINDOW = 32  # how far back (in operations) a size passed to an operation may have been read


@dataclass
class Trace:
    values: list[Value] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    params: dict[str, Value] = field(default_factory=dict)  # name -> Value (params and buffers)
    tensors: list = field(default_factory=list)  # value index -> tensor, when traced with keep_tensors
    # (value index, number of ops recorded so far) for every x.shape / x.size() the model's code read: sizes
    # it computes from them are fixed to the traced widths (blamed when a pruned model fails)
    shape_reads: list[tuple[int, int]] = field(default_factory=list)

    def shapes_read(self, op_index: int, window: int = SHAPE_READ_WINDOW) -> list[int]:
        """The values whose shape the model's code read during the ``window`` operations before operation
        ``op_index`` (sizes it passes to that operation may have been computed from them), nearest first."""
        recent = [vi for vi, at in reversed(self.shape_reads) if op_index - window <= at <= op_index]
        return list(dict.fromkeys(recent))


def _values(obj, out: list) -> list:
    if isinstance(obj, Value):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _values(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _values(item, out)
    return out


def _user_frame() -> str:
    frame = inspect.currentframe()
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_SKIP_DIRS) and "<" not in path:
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


def _is_shape_query(func, name: str) -> bool:
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") == "shape"
    return name == "size"


class _Recorder(TorchFunctionMode):
    def __init__(
        self, trace: Trace, known: WeakIdKeyDictionary, keep: list | None, shapes_only: bool = False
    ) -> None:
        super().__init__()
        self.trace, self.known, self.keep, self.shapes_only = trace, known, keep, shapes_only

    def value_of(self, tensor: torch.Tensor) -> Value:
        value = self.known.get(tensor)
        if value is None:
            value = self.new_value(tensor, "const")
        return value

    def new_value(self, tensor: torch.Tensor, kind: str, producer: int | None = None) -> Value:
        value = Value(len(self.trace.values), tuple(tensor.shape), kind, producer=producer)
        self.trace.values.append(value)
        # weakly keyed by identity: a freed tensor drops out, so a new tensor reusing its id is not
        # mistaken for it, and activations are not kept alive (peak memory stays that of a forward pass)
        self.known[tensor] = value
        if self.keep is not None:
            self.keep.append(tensor)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        heavy = self.shapes_only and name in HEAVY
        out = _shape_only(func, args, kwargs) if heavy else func(*args, **kwargs)
        out_leaves = _tensors(out, [])
        if name == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            out_leaves = [args[0]]  # x[i] = v returns None but writes a new version of x
        if not out_leaves:
            if args and isinstance(args[0], torch.Tensor) and _is_shape_query(func, name):
                value = self.known.get(args[0])
                if value is not None:
                    self.trace.shape_reads.append((value.index, len(self.trace.ops)))
            return out  # shape queries, .item(), ...
        if name == "__get__":  # property access such as Tensor.T / .mT / .data
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        index = len(self.trace.ops)
        recorded_args, recorded_kwargs = _replace(args, self.value_of), _replace(kwargs, self.value_of)
        outputs = [self.new_value(t, "activation", index) for t in out_leaves]
        self.trace.ops.append(Op(index, name, recorded_args, recorded_kwargs, outputs, _user_frame()))
        return out


# the operations whose cost is arithmetic (not memory traffic): a shape-only trace runs them on the meta
# device and continues with zeros of the right shape
HEAVY = {
    *(f"conv{t}{d}d" for t in ("", "_transpose") for d in (1, 2, 3)),
    "linear",
    "matmul",
    "__matmul__",
    "__rmatmul__",
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "einsum",
    "scaled_dot_product_attention",
    "multi_head_attention_forward",
}


def _shape_only(func, args, kwargs):
    name = getattr(func, "__name__", "")
    shape = _conv_shape(args, kwargs) if name in ("conv1d", "conv2d", "conv3d") else None
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if shape is not None and x is not None:
        return torch.zeros(shape, dtype=x.dtype, device=x.device)

    def meta(t: torch.Tensor) -> torch.Tensor:
        return t.to("meta")

    try:
        out = func(*_replace(args, meta), **_replace(kwargs, meta))
    except Exception:  # an operation without a meta kernel: compute it
        return func(*args, **kwargs)
    device = next(iter(_tensors((args, kwargs), [])), torch.empty(())).device
    return _replace(out, lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device))


def _conv_shape(args, kwargs) -> tuple[int, ...] | None:
    """conv{1,2,3}d's output shape by arithmetic (torch's meta kernel takes milliseconds per call); None
    for what it does not cover (the meta kernel then decides). Raises like torch on a channel mismatch."""

    def get(position: int, name: str, default):
        return args[position] if len(args) > position else kwargs.get(name, default)

    x, weight = get(0, "input", None), get(1, "weight", None)
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or x.dim() != weight.dim():
        return None
    k = weight.dim() - 2
    stride, padding, dilation = get(3, "stride", 1), get(4, "padding", 0), get(5, "dilation", 1)
    groups = get(6, "groups", 1)
    if x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"expected input with {weight.shape[1] * groups} channels, got {x.shape[1]}")
    spatial = x.shape[2:]
    if padding == "same":
        return (x.shape[0], weight.shape[0], *spatial)
    if padding == "valid":
        padding = 0
    if isinstance(padding, str):
        return None
    stride, padding, dilation = (
        (v,) * k if isinstance(v, int) else tuple(v) for v in (stride, padding, dilation)
    )
    out = [
        (size + 2 * p - d * (w - 1) - 1) // s + 1
        for size, p, d, w, s in zip(spatial, padding, dilation, weight.shape[2:], stride)
    ]
    if any(o <= 0 for o in out):
        return None
    return (x.shape[0], weight.shape[0], *out)


def _tensors(obj, out: list) -> list:
    """The tensors inside nested tuples / lists / dicts (a fast ``tree_flatten`` for operation arguments)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, (torch.Tensor, tuple, list, dict)):
                _tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, out)
    return out


def _replace(obj, fn):
    """``obj`` with every tensor ``t`` replaced by ``fn(t)`` (containers without tensors come back as is)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list, dict)) and not _tensors(obj, []):
        return obj
    if type(obj) in (tuple, list):
        return type(obj)(_replace(item, fn) for item in obj)
    if type(obj) is dict:
        return {k: _replace(v, fn) for k, v in obj.items()}
    return tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, obj)  # named tuples, ...


@torch.no_grad()
def trace_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    keep_tensors: bool = False,
    into: Trace | None = None,
    shapes_only: bool = False,
) -> Trace:
    """Run ``model(*example_inputs)`` once and record every operation (and every tensor, if asked).

    ``into``: a Trace to fill, so the operations recorded before an exception remain inspectable.
    ``shapes_only``: run the arithmetic-heavy operations (``HEAVY``) on the meta device and continue with
    zeros: the same operations and shapes for a model whose control flow does not depend on values, at a
    fraction of the cost (the pruner's check of a pruned model; anything unexpected is checked again with
    real values).
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    trace = into if into is not None else Trace()
    known = WeakIdKeyDictionary()
    keep: list | None = [] if keep_tensors else None
    recorder = _Recorder(trace, known, keep, shapes_only)
    for name, tensor in [*model.named_parameters(remove_duplicate=True), *model.named_buffers()]:
        value = recorder.new_value(tensor, "param" if isinstance(tensor, nn.Parameter) else "buffer")
        value.name = name
        trace.params[name] = value
    for arg in tree_flatten(args)[0]:
        if isinstance(arg, torch.Tensor):
            trace.inputs.append(recorder.new_value(arg, "input"))
    was_training = model.training
    model.eval()
    try:
        with recorder:
            out = model(*args)
    finally:
        model.train(was_training)
    trace.outputs = [known[t] for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t in known]
    if keep_tensors:
        trace.tensors = keep  # keep[i] is the tensor of trace.values[i]
    return trace
