"""Quantization-aware fine-tuning that keeps the pruning masks.

``prepare_qat(model, ...)`` changes the model in place, like :meth:`Sparsifier.prepare`:

- every chosen layer's ``weight`` gets a :class:`FakeQuantWeight` parametrization, stacked after its
  :class:`~prunekit.masking.WeightMask` when it has one: the forward sees ``dequantize(quantize_int8(
  where(mask, w, 0)))``, and the straight-through estimator passes the gradient to the masked weight,
  so pruned entries get zero gradient and stay exactly zero, as in plain fine-tuning;
- every chosen layer's input goes through an :class:`InputFakeQuant` (a forward pre-hook calling the
  submodule ``input_quant``): ``x_q * s_x`` with the same rounding and clamp as the int8 layer.

The layers are chosen as :func:`prunekit.quant.ptq.choose_layers` chooses them, so a Linear inside a
Transformer layer or MultiheadAttention is not prepared: their fused fast path reads the weights directly
and would skip the input fake-quant hook, and such a layer could not be converted anyway.

Static input scales are calibrated once (``max|x| / 127`` over the calibration batches, as in PTQ) and
then stay fixed during fine-tuning: the weights learn around the grid the int8 model will use, and the
conversion uses exactly those scales. ``convert_qat(model)`` returns the int8 copy.

Why BatchNorm needs no simulated folding here: weights are quantized per output channel and
symmetrically, and folding multiplies each output channel by one scalar, so ``quantize_int8(c * W)`` has
the same integers as ``quantize_int8(W)`` (sign flipped where ``c < 0``) and a scale multiplied by
``|c|``. Fake-quantizing the unfolded weight trains exactly the integers the folded int8 layer gets
(up to float32 rounding of the scale).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError
from prunekit.quant.fake import FakeQuantWeight, InputFakeQuant, quantize_input
from prunekit.quant.ptq import (
    CLASSIFIER_REASON,
    FLOAT_TYPES,
    calibrate,
    check_activations,
    check_runs,
    choose_layers,
    convert,
    input_batches,
    plain_copy,
    weight_readers,
)
from prunekit.targets import classifier_name


def prepare_qat(
    model: nn.Module,
    *,
    activations: str = "static",
    calibration: Iterable | None = None,
    calibration_batches: int | None = 8,
    types: Iterable[str] = ("Linear", "Conv2d"),
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    classifier: bool = False,
) -> list[str]:
    """Add weight and input fake-quant to the layers :func:`prunekit.quant.ptq.quantize` would convert (same
    arguments); returns their names. Train as usual, then :func:`convert_qat`."""
    check_activations(activations)
    if any(isinstance(m, (FakeQuantWeight, InputFakeQuant)) for m in model.modules()):
        raise PrunekitError("the model is already prepared for QAT")
    layers, _ = choose_layers(model, types, include, exclude, classifier)
    scales: dict[str, Tensor] = {}
    if activations == "static":
        batches = input_batches(calibration, calibration_batches)
        scales = calibrate(plain_copy(model), layers, batches)  # the float model, as PTQ calibrates
        missing = [n for n in layers if n not in scales]
        if missing:
            raise PrunekitError(f"QAT: layers {missing} are not run by the calibration batches")
    for name in layers:
        module = model.get_submodule(name)
        parametrize.register_parametrization(module, "weight", FakeQuantWeight(), unsafe=True)
        module.input_quant = InputFakeQuant(scales.get(name))
        module.register_forward_pre_hook(quantize_input)
    return layers


def convert_qat(model: nn.Module, *, example: Tensor | None = None) -> Any:
    """The int8 copy of a QAT-prepared model (a :class:`prunekit.quant.ptq.Quantized`), with the trained
    scales: in eval mode the int8 model computes what the fake-quant model computed, up to float rounding.
    ``example``: an input the int8 model is run on once as a check (:func:`prunekit.quant.ptq.check_runs`)."""

    scales = _scales(model)
    if not scales:
        raise PrunekitError("the model is not prepared for QAT (prepare_qat first)")
    dynamic = [n for n, s in scales.items() if s is None]
    if dynamic and len(dynamic) != len(scales):
        raise PrunekitError("QAT layers mix static and dynamic activations; prepare_qat sets one mode")
    work = plain_copy(model).eval()  # plain_copy strips QAT from the copy only
    result = convert(work, "dynamic" if dynamic else "static", list(scales), None if dynamic else scales)
    head, owned = classifier_name(model), weight_readers(model)
    for name, module in model.named_modules():
        if (
            isinstance(module, FLOAT_TYPES)
            and name not in scales
            and "parametrizations" not in name.split(".")
        ):
            reason = owned.get(name, CLASSIFIER_REASON if name == head else "not prepared for QAT")
            result.left_float.setdefault(name, reason)
    check_runs(result.model, example)
    return result


def _scales(model: nn.Module) -> dict[str, Tensor | None]:
    return {
        name: m.input_quant.scale
        for name, m in model.named_modules()
        if isinstance(getattr(m, "input_quant", None), InputFakeQuant)
    }
