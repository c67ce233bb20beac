"""The dense engines a user would deploy instead (the baselines prunekit's variants are timed against):
each runs the dense model's function, and a missing engine is a skipped row with its reason."""

from __future__ import annotations

import builtins

import pytest
import torch

from fixtures.int8nets import randomize_bn
from prunekit.export.engines import BASELINES, ORT_FP32, ORT_INT8, TORCH_INT8, dense_baselines
from prunekit.models import SmallResNet

pytest.importorskip("onnxruntime")


def tiny() -> SmallResNet:
    torch.manual_seed(0)
    model = SmallResNet(widths=[8, 16], blocks=1)
    randomize_bn(model)
    return model.eval()


def test_every_baseline_computes_the_dense_model(tmp_path):
    model = tiny()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    found = {b.name: b for b in dense_baselines(model, torch.randn(1, 1, 8, 8), calib, tmp_path)}
    assert list(found) == list(BASELINES) and not any(b.skipped for b in found.values())
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        top = float(want.abs().max())
        assert (found[ORT_FP32].model(x) - want).abs().max() <= 1e-4 * top  # float32: the same function
        for name in (TORCH_INT8, ORT_INT8):  # int8: close, not equal
            assert (found[name].model(x) - want).abs().max() <= 0.1 * top, name
    assert found[ORT_INT8].size_bytes < found[ORT_FP32].size_bytes  # int8 weights


def test_missing_onnxruntime_skips_its_rows_with_the_reason(monkeypatch, tmp_path):
    real = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    found = dense_baselines(tiny(), torch.randn(1, 1, 8, 8), [torch.randn(4, 1, 8, 8)], tmp_path)
    skipped = {b.name: b.skipped for b in found if b.model is None}
    assert set(skipped) == {ORT_FP32, ORT_INT8}
    assert all("onnxruntime is not installed" in why and "prunekit[onnx]" in why for why in skipped.values())
    assert [b.name for b in found if b.model is not None] == [TORCH_INT8]
