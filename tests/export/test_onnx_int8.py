"""INT8 ONNX export (QDQ): onnxruntime runs prunekit's INT8 models, unstructured- and structurally pruned,
and gives prunekit's integer outputs (within one int8 step of the output; measured: within 1e-4 step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

from fixtures.cli import call_main  # noqa: E402
from fixtures.int8nets import nets, prune_random, randomize_bn  # noqa: E402
from prunekit.artifact import save_artifact  # noqa: E402
from prunekit.export import export_onnx  # noqa: E402
from prunekit.models import SmallResNet  # noqa: E402
from prunekit.quant.ptq import quantize  # noqa: E402
from prunekit.structured import prune_model  # noqa: E402


def run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def steps_apart(path, q, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = q(x).numpy()
    return float(np.abs(run(path, x) - want).max() / (np.abs(want).max() / 127))


def qdq_ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nets(), st.integers(0, 2**16), st.booleans())
def test_random_int8_models_round_trip(tmp_path_factory, net, seed, head):
    model, shape, sparsity, _ = net
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model)
    prune_random(model, sparsity, gen)
    x = torch.randn((16, *shape), generator=gen) * 3
    q = quantize(model, calibration=[x], classifier=head).model
    path = tmp_path_factory.mktemp("onnx") / "q.onnx"
    report = export_onnx(q, x[:2], path)
    assert report["quantized"] == "int8 (QDQ)" and report["int8"]["max_steps"] <= 1.0
    assert report["int8"]["preserved"]  # every int8 weight an int8 initializer, its zeros kept
    assert {"QuantizeLinear", "DequantizeLinear"} <= qdq_ops(path)
    assert steps_apart(path, q, torch.randn((32, *shape), generator=gen) * 3) <= 1.0


def tiny(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    model = SmallResNet(widths=[8, 16], blocks=1)
    randomize_bn(model)
    return model.eval()


def test_unstructured_pruned_int8_resnet(tmp_path):
    model = tiny()
    prune_random(model, 0.7, torch.Generator().manual_seed(0))
    x = torch.randn(64, 1, 8, 8)
    q = quantize(model, calibration=[x], classifier=True).model
    path = tmp_path / "q.onnx"
    report = export_onnx(q, x[:4], path)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    int8 = [w for w in weights if w.dtype == np.int8 and w.ndim >= 2]
    assert len(int8) == report["int8"]["weights"] == 7
    assert report["int8"]["zeros_onnx"] == report["int8"]["zeros_model"] > 0.6 * sum(w.size for w in int8)
    assert steps_apart(path, q, torch.randn(128, 1, 8, 8)) < 1e-3  # integers equal; float32 noise only


def test_structurally_pruned_int8_resnet(tmp_path):
    model = tiny()
    x = torch.randn(64, 1, 8, 8)
    prune_model(model, x[:2], ratio=0.5, round_to=1)
    q = quantize(model.eval(), calibration=[x], classifier=True).model
    path = tmp_path / "q.onnx"
    report = export_onnx(q, x[:4], path)
    assert report["int8"]["max_steps"] <= 1.0
    shapes = sorted(tuple(numpy_helper.to_array(t).shape) for t in onnx.load(str(path)).graph.initializer)
    assert (4, 1, 3, 3) in shapes  # the stem's 8 channels halved: the smaller model, not padded back
    assert steps_apart(path, q, torch.randn(128, 1, 8, 8)) < 1e-3


def test_cli_exports_an_int8_artifact(monkeypatch, capsys, tmp_path):
    model = tiny()
    x = torch.randn(32, 1, 8, 8)
    q = quantize(model, calibration=[x], classifier=True).model
    path = tmp_path / "q.safetensors"
    save_artifact(path, q, model_info={"name": "resnet-digits", "args": {"widths": [8, 16], "blocks": 1}})
    out = tmp_path / "q.onnx"
    code, text, err = call_main(monkeypatch, capsys, "export", "onnx", str(path), "--out", str(out))
    assert code == 0, err
    assert "onnxruntime (QDQ) vs prunekit's int8 model" in text and out.is_file()
