"""The dense engines a user would deploy a model with instead of pruning it: the baselines a pruned model
has to beat, built from the dense float model, each an ``nn.Module`` taking the same input, so that
:func:`prunekit.analysis.compare_latency` times them interleaved with prunekit's variants.

- ``torch-x86-int8``: torch's own INT8 (FX graph mode static quantization, ``x86`` backend: fbgemm /
  oneDNN kernels that use VNNI where the CPU has it; per-channel int8 weights, per-tensor activations
  calibrated on ``calibration``).
- ``onnxruntime-fp32``: the dense model exported to ONNX (:func:`prunekit.export.onnx.export_onnx`) on
  onnxruntime's CPU provider, all graph optimizations on.
- ``onnxruntime-int8``: that file quantized by onnxruntime's own static quantizer (QDQ format, per-channel
  int8 weights, int8 activations calibrated on ``calibration``, MinMax): the dense INT8 a user would get from
  onnxruntime's tools.

They are speed baselines: their accuracy is not measured here. A baseline that cannot be built (onnx or
onnxruntime not installed, no x86 quantized engine on this CPU, a model fx cannot trace) comes back with
``model=None`` and the reason in ``skipped``. onnxruntime sessions run with as many intra-op threads as
torch has when they are made, and without spin-waiting (``allow_spinning=0``): spinning threads would keep
a core busy after each call and slow the variant timed next.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.export.onnx import export_onnx

with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao; it still works
    warnings.simplefilter("ignore")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

log = logging.getLogger(__name__)

TORCH_INT8 = "torch-x86-int8"
ORT_FP32 = "onnxruntime-fp32"
ORT_INT8 = "onnxruntime-int8"
BASELINES = (TORCH_INT8, ORT_FP32, ORT_INT8)
ENGINES = {
    TORCH_INT8: "torch x86 INT8 (FX static, per-channel weights)",
    ORT_FP32: "onnxruntime float32",
    ORT_INT8: "onnxruntime INT8 (QDQ static, per-channel weights)",
}


@dataclass
class Baseline:
    name: str
    engine: str
    model: nn.Module | None
    skipped: str = ""
    size_bytes: int | None = None  # the file it would ship as (ONNX), where there is one


class OrtModule(nn.Module):
    """An onnxruntime session as a module: ``forward(x)`` runs the file on ``x`` (one input, one output)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().numpy()})[0])

    def __deepcopy__(self, memo) -> OrtModule:  # a session cannot be copied: open the file again
        return OrtModule(self.path, self.session.get_session_options().intra_op_num_threads)


def torch_x86_int8(model: nn.Module, example: Tensor, calibration: list[Tensor]) -> nn.Module:
    """torch's static INT8 of the float ``model`` on its ``x86`` quantized engine (module docstring)."""
    if "x86" not in torch.backends.quantized.supported_engines:
        raise PrunekitError(
            f"torch has no x86 quantized engine here ({torch.backends.quantized.supported_engines})"
        )
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return convert_fx(prepared).eval()


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, name: str, batches: list[Tensor]) -> None:
        self.items = iter([{name: x.numpy().astype(np.float32)} for x in batches])

    def get_next(self):
        return next(self.items, None)


def ort_int8(fp32: Path, out: Path, calibration: list[Tensor]) -> Path:
    """onnxruntime's own static INT8 of the float32 file (module docstring)."""
    import onnx

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model goes to the root logger
    try:
        _quantize_static(fp32, out, name, calibration)
    finally:
        root.setLevel(level)
    return out


def _quantize_static(fp32: Path, out: Path, name: str, calibration: list[Tensor]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32),
        str(out),
        _Reader(name, calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def dense_baselines(
    model: nn.Module,
    example: Tensor,
    calibration: list[Tensor],
    workdir: str | Path | None = None,
    names: tuple[str, ...] = BASELINES,
) -> list[Baseline]:
    """The baselines ``names`` of the dense float ``model`` (module docstring); ``example``: one input of
    the shape to serve; ``workdir``: where the ONNX files go (a temporary directory when None; the
    sessions keep their files open, so keep a workdir you pass alive while they run)."""
    out: list[Baseline] = []
    workdir = Path(workdir or tempfile.mkdtemp(prefix="prunekit-baselines-"))
    if TORCH_INT8 in names:
        try:
            out.append(Baseline(TORCH_INT8, ENGINES[TORCH_INT8], torch_x86_int8(model, example, calibration)))
        except Exception as exc:  # fx tracing and the quantizer raise many types: the row is skipped
            out.append(Baseline(TORCH_INT8, ENGINES[TORCH_INT8], None, _why(exc)))
    wanted = [n for n in (ORT_FP32, ORT_INT8) if n in names]
    if not wanted:
        return out
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        why = 'onnxruntime is not installed (pip install "prunekit[onnx]")'
        return out + [Baseline(n, ENGINES[n], None, why) for n in wanted]
    fp32 = workdir / "dense-fp32.onnx"
    try:
        export_onnx(model, example, fp32)
    except PrunekitError as exc:
        return out + [Baseline(n, ENGINES[n], None, f"ONNX export failed: {exc}") for n in wanted]
    if ORT_FP32 in names:
        out.append(Baseline(ORT_FP32, ENGINES[ORT_FP32], OrtModule(fp32), size_bytes=fp32.stat().st_size))
    if ORT_INT8 in names:
        try:
            path = ort_int8(fp32, workdir / "dense-int8.onnx", calibration)
            out.append(Baseline(ORT_INT8, ENGINES[ORT_INT8], OrtModule(path), size_bytes=path.stat().st_size))
        except Exception as exc:  # onnxruntime's quantizer raises many types: the row is skipped
            out.append(Baseline(ORT_INT8, ENGINES[ORT_INT8], None, _why(exc)))
    for b in out:
        if b.skipped:
            log.warning("baseline %s skipped: %s", b.name, b.skipped)
    return out


def _why(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]
