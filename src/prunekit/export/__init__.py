"""Export pruned models for deployment.

``export_onnx(model, example_inputs, path)`` writes one ONNX file (plain weights, pruned entries exact
zeros, no parametrization ops) and checks it with onnxruntime against PyTorch. onnx, onnxruntime and
onnxscript are imported only when an export runs (``pip install "prunekit[onnx]"``). INT8 models with
static activations are written as QDQ ONNX (:mod:`prunekit.export.qdq`), checked in quantization steps.
"""

from prunekit.export.onnx import export_onnx

__all__ = ["export_onnx"]
