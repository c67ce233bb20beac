"""Dense INT8 engines a user would deploy instead of prunekit, and the rule that picks an INT8 engine.

The engines (dense kernels; they run the pruned zeros as ordinary values):

* :func:`torch_x86` -- torch's own static post-training quantization (FX graph mode, ``x86`` backend:
  fbgemm / oneDNN, which use the integer dot-product instructions where the CPU has them), per-channel
  weights, calibrated on the batches given;
* :func:`onnxruntime_model` -- the model exported to ONNX and, for INT8, quantized by onnxruntime's
  ``quantize_static`` (QDQ, per-channel s8 weights, u8 activations, after ``quant_pre_process``), run by an
  ``InferenceSession`` with ``intra_op_num_threads`` following torch's thread count.

Both requantize with their own rules (float multipliers, zero points, their own calibration), so their
integers are not prunekit's (:mod:`prunekit.quant.layers`): they are speed references and deployment
targets, not drop-in replacements. :func:`choose_int8` is the decision among INT8 engines, with the
pruned float32 model as the bar an INT8 model must beat.
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from prunekit.errors import PrunekitError

FLOAT32 = "float32"


@dataclass(frozen=True)
class Int8Choice:
    """What :func:`choose_int8` decided: ``engine`` (a candidate's name, or :data:`FLOAT32`), its median,
    and why."""

    engine: str
    us: float
    reason: str


def choose_int8(
    candidates: Mapping[str, tuple[float, bool]],
    float_us: float | None,
    *,
    allow_inexact: bool = False,
    margin: float = 0.0,
) -> Int8Choice:
    """The INT8 engine to run: the fastest candidate (``name -> (median us, exact)``; exact: computes
    prunekit's integers bit for bit), inexact ones only with ``allow_inexact``; and never slower than the
    pruned float32 model it came from (``float_us``): when every allowed INT8 engine is more than
    ``margin`` slower than that, the answer is :data:`FLOAT32` (run the float32 model; INT8 buys size
    there, not speed). Pure: timings in, a decision out."""
    allowed = {k: us for k, (us, exact) in candidates.items() if exact or allow_inexact}
    if not allowed:
        if float_us is None:
            raise PrunekitError("choose_int8: no allowed INT8 engine and no float32 time to fall back on")
        return Int8Choice(FLOAT32, float_us, "no allowed INT8 engine")
    best = min(allowed, key=allowed.get)
    if float_us is not None and allowed[best] > float_us * (1.0 + margin):
        return Int8Choice(
            FLOAT32,
            float_us,
            f"the fastest INT8 engine ({best}, {allowed[best]:.0f} us) is slower than float32",
        )
    skipped = [
        k for k, (us, exact) in candidates.items() if not exact and not allow_inexact and us < allowed[best]
    ]
    note = f"; faster but not prunekit's integers: {', '.join(skipped)}" if skipped else ""
    return Int8Choice(best, allowed[best], f"fastest allowed INT8 engine{note}")


def torch_x86(model: nn.Module, calibration: Iterable[Tensor]) -> nn.Module:
    """``model`` (float32, eval) quantized by torch's FX static PTQ for the ``x86`` backend (per-channel)."""
    batches = list(calibration)
    if not batches:
        raise PrunekitError("torch_x86: needs at least one calibration batch")
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (batches[0],))
    with torch.inference_mode():
        for batch in batches:
            prepared(batch)
    return convert_fx(prepared).eval()


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind a module's call: ``model(x)`` -> torch tensor (CPU provider)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.path = str(path)

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().numpy()})[0])


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike) -> None:
    """The float32 model as ONNX (opset 17, the TorchScript exporter: plain Conv/Gemm nodes)."""
    with torch.inference_mode():
        torch.onnx.export(
            copy.deepcopy(model).eval(), (example,), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["y"],
        )  # fmt: skip


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, calibration: Iterable[Tensor]) -> None:
    """onnxruntime static QDQ quantization: per-channel s8 weights, u8 activations (min/max calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = [{"x": b.detach().numpy()} for b in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    pre = f"{dst}.pre.onnx"
    quant_pre_process(str(src), pre)
    quantize_static(
        pre, str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    os.remove(pre)


def onnxruntime_model(
    model: nn.Module,
    example: Tensor,
    calibration: Iterable[Tensor] | None = None,
    directory: str | os.PathLike | None = None,
    threads: int | None = None,
) -> OnnxRuntimeModel:
    """``model`` on onnxruntime: float32, or INT8 (static QDQ, per-channel) when ``calibration`` is given.
    The .onnx files go to ``directory`` (a temporary one by default, kept while the process runs)."""
    folder = str(directory or tempfile.mkdtemp(prefix="prunekit-ort-"))
    os.makedirs(folder, exist_ok=True)
    f32 = os.path.join(folder, "model.onnx")
    export_onnx(model, example, f32)
    if calibration is None:
        return OnnxRuntimeModel(f32, threads)
    int8 = os.path.join(folder, "model.int8.onnx")
    quantize_onnx(f32, int8, calibration)
    return OnnxRuntimeModel(int8, threads)


def _median_us(fns: Mapping[str, object], x: Tensor, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter_ns()
                fns[k](x)
                samples[k].append((time.perf_counter_ns() - t0) / 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def fastest_int8(
    int8_models: Mapping[str, nn.Module],
    example: Tensor,
    *,
    float_model: nn.Module | None = None,
    float_source: nn.Module | None = None,
    calibration: Iterable[Tensor] | None = None,
    allow_inexact: bool = False,
    rounds: int = 15,
) -> tuple[nn.Module, Int8Choice, dict[str, float]]:
    """Time INT8 engines on ``example`` (interleaved) and run :func:`choose_int8` over them.

    ``int8_models``: prunekit INT8 models (e.g. ``{"prunekit": runtime.compile(int8)}``), exact by
    construction. With ``allow_inexact`` and the float32 ``float_source`` + ``calibration``, torch-x86 and
    onnxruntime INT8 builds of it join as inexact candidates (their own requantization). ``float_model``:
    the pruned float32 model (compiled) the INT8 one must not be slower than. Returns the chosen module,
    the choice and every median (us)."""
    candidates: dict[str, nn.Module] = dict(int8_models)
    exact = dict.fromkeys(candidates, True)
    if allow_inexact:
        if float_source is None or calibration is None:
            raise PrunekitError("fastest_int8: allow_inexact needs float_source= and calibration=")
        batches = list(calibration)
        candidates["torch-x86"] = torch_x86(float_source, batches)
        exact["torch-x86"] = False
        try:
            candidates["onnxruntime"] = onnxruntime_model(float_source, example, batches)
            exact["onnxruntime"] = False
        except ImportError:  # onnxruntime is an optional extra
            pass
    fns = dict(candidates)
    if float_model is not None:
        fns[FLOAT32] = float_model
    medians = _median_us(fns, example, rounds)
    float_us = medians.get(FLOAT32)
    choice = choose_int8(
        {k: (medians[k], exact[k]) for k in candidates}, float_us, allow_inexact=allow_inexact
    )
    chosen = float_model if choice.engine == FLOAT32 else candidates[choice.engine]
    return chosen, choice, medians
