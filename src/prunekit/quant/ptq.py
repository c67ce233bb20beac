"""Post-training INT8 conversion of a (pruned) model into :mod:`prunekit.quant.layers` layers.

:func:`quantize` (and its short form :func:`prunekit.quant.ptq.quantize_model`) returns a converted copy
with what was done to each layer; the model passed in is not touched. In order:

1. Masks are squashed (and QAT fake-quant removed), so a pruned weight is an exact zero before rounding;
   per-channel symmetric rounding maps zero to zero, so every pruned position is 0 in ``weight_q``.
2. ``nn.Linear`` and ``nn.Conv2d`` layers are chosen like pruning targets: ``types``, ``include`` /
   ``exclude`` globs, and the final classifier stays float32 unless ``classifier=True`` (it is a few
   weights and the layer whose rounding moves the logits most; one switch to include it). A Linear
   inside ``nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` / ``MultiheadAttention`` (and its
   subclasses, such as the head-pruned one) stays float: their forward reads ``linear1.weight`` and
   ``out_proj.weight`` directly (the fused fast path), which an int8 layer does not have. A dequantized
   ``weight`` property would make that work by silently running float kernels, so there is none.
3. Static activations: each chosen layer's input scale is ``max|x| / 127`` over the calibration batches,
   run through the float model in eval mode (max, not a percentile: these small ReLU networks have no
   outliers worth clipping, and max never clips an input the calibration saw). Dynamic activations
   compute ``max|x| / 127`` per call instead and need no data.
4. BatchNorm that follows a chosen convolution is folded into its int8 weights and float32 bias where
   that is safe (:mod:`prunekit.quant.fold`); its place is taken by :class:`FoldedBatchNorm`. Other BatchNorms
   stay float, each in ``left_float`` with its reason (including one whose convolution stays float).
5. The converted model is run once on the first calibration batch (or ``example``), so a module whose
   forward reads a converted layer's float ``weight`` is a one-line error here, not at the first use.

The converted model describes itself: :func:`int8_plan` reads which layers are int8 (and which BatchNorms
were folded) off the modules, and :func:`build_int8` rebuilds that skeleton from a fresh float model, so a
saved artifact reloads to the identical int8 model without pickle.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.calib.hooks import Hooks
from prunekit.errors import PrunekitError, did_you_mean
from prunekit.masking import own_class, type_name
from prunekit.quant.fake import strip_qat
from prunekit.quant.fold import FoldedBatchNorm, find_conv_bn, fold_conv_bn
from prunekit.quant.graph import integer_plan, integerize, rebuild
from prunekit.quant.layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from prunekit.quant.rounding import activation_scale
from prunekit.targets import classifier_name

log = logging.getLogger(__name__)

ACTIVATIONS = ("static", "dynamic")
QUANTIZABLE = {"Linear": QuantizedLinear, "Conv2d": QuantizedConv2d}
FLOAT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding)
# modules whose forward reads their Linear children's ``weight`` (and ``bias``) directly instead of calling
# them; subclasses count too (prunekit.structured.mha.HeadPrunedMultiheadAttention is a MultiheadAttention)
WEIGHT_READERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)
CLASSIFIER_REASON = "final classifier (float32 by default; classifier=True makes it int8)"


@dataclass
class Quantized:
    """A conversion's result: the int8 model and what happened to each layer."""

    model: nn.Module
    activations: str
    int8: list[str] = field(default_factory=list)  # layers now QuantizedLinear / QuantizedConv2d
    folded: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> the conv it was folded into
    left_float: dict[str, str] = field(default_factory=dict)  # weighted layer or BatchNorm -> why float
    integer: bool = False  # one integer graph from input to output (prunekit.quant.graph.integerize)
    integer_reason: str = ""  # why not, when not

    def summary(self) -> dict[str, Any]:
        return {
            "activations": self.activations,
            "int8": list(self.int8),
            "folded": dict(self.folded),
            "left_float": dict(self.left_float),
            "integer": self.integer,
            "integer_reason": self.integer_reason,
        }

    def make_integer(self, batches: list[Tensor]) -> None:
        """Turn the converted model into the integer model (:func:`prunekit.quant.graph.integerize`),
        calibrated on ``batches``; static activations only (dynamic ones keep float outputs)."""
        if self.activations != "static":
            self.integer_reason = "dynamic activations (no static scales to requantize to)"
            return
        done = integerize(self.model, batches)
        self.model, self.integer, self.integer_reason = done.model, done.integer, done.reason


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise PrunekitError(
            f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}"
            f"{did_you_mean(str(activations), ACTIVATIONS)}"
        )


def input_batches(calibration: Iterable | None, limit: int | None) -> list[Tensor]:
    """The first ``limit`` input tensors of ``calibration`` (tensors, or (x, y) tuples/lists)."""
    if calibration is None:
        raise PrunekitError(
            "activations 'static' needs calibration data: pass calibration= an iterable of input batches "
            "or (x, y) batches, or use activations='dynamic'"
        )
    if limit is not None and limit < 1:
        raise PrunekitError(f"calibration_batches must be >= 1, got {limit}")
    out = []
    for batch in calibration:
        if limit is not None and len(out) >= limit:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, Tensor):
            raise PrunekitError(
                f"calibration batches must be tensors or (x, y) tuples whose first item is a tensor, "
                f"got {type(batch).__name__}"
            )
        out.append(x)
    if not out:
        raise PrunekitError("calibration is empty: static activations need at least one input batch")
    return out


def weight_readers(model: nn.Module) -> dict[str, str]:
    """Layer name -> why it stays float, for every weighted layer inside a :data:`WEIGHT_READERS` module
    (the innermost such owner is named)."""
    out = {}
    for owner, module in model.named_modules():
        if not isinstance(module, WEIGHT_READERS):
            continue
        kind = type_name(module)
        for sub, child in module.named_modules():
            if sub and isinstance(child, FLOAT_TYPES) and "parametrizations" not in sub.split("."):
                out[f"{owner}.{sub}" if owner else sub] = (
                    f"inside {kind} '{owner}', whose forward reads the Linear weights directly "
                    f"(an int8 layer has none)"
                )
    return out


def choose_layers(
    model: nn.Module,
    types: Iterable[str] = tuple(QUANTIZABLE),
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    classifier: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """``(chosen, left_float)``: the layers to convert, and every other weighted layer with its reason."""
    types, include, exclude = (
        _strings(types, "types"),
        _strings(include, "include"),
        _strings(exclude, "exclude"),
    )
    for kind in types:
        if kind not in QUANTIZABLE:
            raise PrunekitError(
                f"quantize types: '{kind}' cannot be int8{did_you_mean(kind, QUANTIZABLE)}; "
                f"allowed: {', '.join(QUANTIZABLE)}"
            )
    names = [n for n, _ in model.named_modules() if n]
    for pattern_field, patterns in (("include", include), ("exclude", exclude)):
        unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused:
            raise PrunekitError(f"quantize {pattern_field} pattern(s) {unused} match no module")
    head = None if classifier else classifier_name(model)
    owned = weight_readers(model)
    chosen, left = [], {}
    for name, module in model.named_modules():
        kind = type_name(module)
        if not isinstance(module, FLOAT_TYPES) or "parametrizations" in name.split("."):
            continue
        if name in owned:
            left[name] = owned[name]
        elif kind not in QUANTIZABLE:
            left[name] = f"{kind} has no int8 layer"
        elif name == head:
            left[name] = CLASSIFIER_REASON
        elif kind not in types or (include and not any(fnmatch.fnmatchcase(name, p) for p in include)):
            left[name] = "not selected by types/include"
        elif any(fnmatch.fnmatchcase(name, p) for p in exclude):
            left[name] = "excluded"
        elif isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            left[name] = f"padding_mode '{module.padding_mode}' (int8 convolution pads with zeros)"
        else:
            chosen.append(name)
    if not chosen:
        raise PrunekitError(
            f"no layer to quantize (types={list(types)}, include={list(include)}, exclude={list(exclude)}, "
            f"classifier={classifier}); left float: {left or 'the model has no Linear/Conv2d'}"
        )
    return chosen, left


def _strings(value: Any, name: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) for v in items):
        raise PrunekitError(f"quantize {name} must be a list of strings, got {value!r}")
    return items


@torch.no_grad()
def calibrate(model: nn.Module, layers: Iterable[str], batches: list[Tensor]) -> dict[str, Tensor]:
    """Static input scales ``max|x| / 127`` of each layer over ``batches`` (float model, eval mode)."""

    top: dict[str, Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            value = args[0].detach().abs().amax().to(torch.float32)
            top[name] = torch.maximum(top[name], value) if name in top else value

        return hook

    was_training = model.training
    model.eval()
    try:
        with Hooks() as hooks:
            for name in layers:
                hooks.forward_pre(model.get_submodule(name), record(name))
            for x in batches:
                model(x)
    finally:
        model.train(was_training)
    # the same rule as a dynamic scale (quantize_activation): an all-zero input gets scale 1
    return {n: activation_scale(t) for n, t in top.items()}


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy with every weight parametrization (masks, fake-quant) written in and removed."""

    work = copy.deepcopy(model)
    strip_qat(work)
    for _, module in list(work.named_modules()):
        if parametrize.is_parametrized(module, "weight"):
            own_class(module)  # the copy shares the injected class with the original: detach it first
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return work


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def convert(
    work: nn.Module, activations: str, layers: list[str], scales: Mapping[str, Tensor] | None
) -> Quantized:
    """Replace ``layers`` of the plain float model ``work`` in place (BatchNorms folded where safe)."""
    result = Quantized(work, activations)
    pairs, kept = find_conv_bn(work)
    for name in layers:
        module = work.get_submodule(name)
        scale = None
        if activations == "static":
            if name not in scales:
                result.left_float[name] = "not run by the calibration batches (no input scale)"
                continue
            scale = scales[name]
        weight, bias = module.weight, module.bias
        if name in pairs:
            bn_name = pairs[name]
            weight, bias = fold_conv_bn(weight, bias, work.get_submodule(bn_name))
            _set(work, bn_name, FoldedBatchNorm(name))
            result.folded[bn_name] = name
        layer = QUANTIZABLE[type_name(module)](module, scale, weight=weight, bias=bias)
        lost = int(((layer.weight_q == 0) & (weight != 0)).sum())
        if lost:  # the weight, not a mask: a kept weight below half a step rounds to zero
            log.info("int8: %s: %d non-zero weights round to zero", name, lost)
        _set(work, name, layer)
        result.int8.append(name)
    for bn_name, reason in kept.items():
        result.left_float[bn_name] = f"BatchNorm kept float: {reason}"
    for conv_name, bn_name in pairs.items():
        if bn_name not in result.folded:  # its convolution was excluded, left float or never calibrated
            result.left_float[bn_name] = f"BatchNorm kept float: its convolution '{conv_name}' stays float"
    log.info(
        "int8 (%s activations): %d layers, %d BatchNorms folded",
        activations,
        len(result.int8),
        len(result.folded),
    )
    result.model.eval()
    return result


def quantize(
    model: nn.Module,
    *,
    activations: str = "static",
    calibration: Iterable | None = None,
    calibration_batches: int | None = 8,
    types: Iterable[str] = tuple(QUANTIZABLE),
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    classifier: bool = False,
    example: Tensor | None = None,
) -> Quantized:
    """Convert a copy of ``model`` to INT8 (module docstring); returns it with what was done per layer.

    ``calibration``: input batches, or (x, y) batches, for static activations; the first
    ``calibration_batches`` are used (None: all of them). ``example``: an input the converted model is
    run on once as a check (default: the first calibration batch; dynamic without one: no check).
    """
    check_activations(activations)
    if any(isinstance(m, QuantizedLayer) for m in model.modules()):
        raise PrunekitError("the model already has int8 layers: quantize the float model once")
    batches = input_batches(calibration, calibration_batches) if activations == "static" else []
    work = plain_copy(model).eval()
    layers, left = choose_layers(work, types, include, exclude, classifier)
    scales = calibrate(work, layers, batches) if activations == "static" else None
    result = convert(work, activations, layers, scales)
    result.left_float = {**left, **result.left_float}
    result.make_integer(batches)
    check_runs(result.model, example if example is not None else (batches[0] if batches else None))
    return result


def quantize_model(model: nn.Module, **kwargs) -> nn.Module:
    """An INT8 copy of ``model``: :func:`quantize` (``activations="static" | "dynamic"``,
    ``calibration=`` batches, ``calibration_batches``, ``types`` / ``include`` / ``exclude``,
    ``classifier``), returning only the converted model."""
    return quantize(model, **kwargs).model


@torch.no_grad()
def check_runs(model: nn.Module, example: Tensor | None) -> None:
    """Run the converted ``model`` once on ``example`` (nothing when None); a failure becomes a one-line
    PrunekitError naming the module whose forward failed (typically one reading an int8 layer's
    ``weight``: int8 layers hold ``weight_q``)."""
    if example is None:
        return
    try:
        model(example)
    except Exception as exc:  # any failure of a user's forward: reported, with its type, in one line
        where = _failing_module(model, exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = (
            " (its forward reads the float weight of a layer now int8, which holds weight_q: "
            "exclude= that layer)"
            if isinstance(exc, AttributeError) and "Quantized" in first
            else ""
        )
        raise PrunekitError(
            f"the int8 model fails on a test run{where}: {type(exc).__name__}: {first}{hint}"
        ) from None


def _failing_module(model: nn.Module, exc: BaseException) -> str:
    """`` in 'name' (Type)`` for the innermost module whose ``forward`` is in the traceback, or ''."""
    names = {id(m): n for n, m in model.named_modules()}
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and id(owner) in names:
            found = f" in '{names[id(owner)] or 'the model'}' ({type_name(owner)})"
        tb = tb.tb_next
    return found


def int8_plan(model: nn.Module) -> dict[str, Any] | None:
    """What makes ``model`` int8, read off its modules (None for a float model): saved with artifacts.
    ``output`` per layer: None (float output), ``int8`` or ``int32`` (the integer forms); ``graph``: the
    integer operators :func:`prunekit.quant.graph.integerize` inserted (integer models only)."""
    layers = {
        name: {
            "type": type(m).__name__,
            "static": m.act_scale is not None,
            "bias": m.bias is not None,
            "output": ("int32" if m.wide else "int8") if m.integer_output else None,
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLayer)
    }
    if not layers:
        return None
    folded = {name: m.into for name, m in model.named_modules() if isinstance(m, FoldedBatchNorm)}
    plan: dict[str, Any] = {"layers": layers, "folded": folded}
    graph = integer_plan(model)
    if graph is not None:
        plan["graph"] = graph
    return plan


def build_int8(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Turn a fresh float model into the int8 skeleton ``plan`` describes (values come from a state dict)."""
    by_name = {cls.__name__: (kind, cls) for kind, cls in QUANTIZABLE.items()}
    for bn_name, into in plan.get("folded", {}).items():
        model.get_submodule(bn_name)  # an AttributeError names a module the model lacks
        _set(model, bn_name, FoldedBatchNorm(into))
    for name, entry in plan["layers"].items():
        module = model.get_submodule(name)
        if entry["type"] not in by_name or type_name(module) != by_name[entry["type"]][0]:
            raise PrunekitError(
                f"int8 layer '{name}' is {entry['type']} but the model has {type_name(module)}"
            )
        out = module.weight.shape[0]
        bias = torch.zeros(out) if entry["bias"] and module.bias is None else None
        scale = torch.ones(()) if entry["static"] else None
        _set(model, name, by_name[entry["type"]][1](module, scale, bias=bias))
    if "graph" in plan:
        return rebuild(model, plan["graph"])  # also gives each layer its output buffers
    for name, entry in plan["layers"].items():
        if entry.get("output"):  # a layer-wise model with integer outputs is never written; be exact anyway
            model.get_submodule(name).output_skeleton(wide=entry["output"] == "int32")
    return model.eval()
