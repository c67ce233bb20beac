"""Export pruned models for deployment.

``export_onnx(model, example_inputs, path)`` writes one ONNX file (plain weights, pruned entries exact
zeros, no parametrization ops) and checks it with onnxruntime against PyTorch. onnx, onnxruntime and
onnxscript are imported only when an export runs (``pip install "prunekit[onnx]"``).
"""

from prunekit.export.onnx import export_onnx

__all__ = ["export_onnx"]
