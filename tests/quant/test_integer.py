"""One INT8 arithmetic everywhere: the PyTorch int8 model (prunekit.quant.graph.integerize), the runtime's
int8 kernels and the C export's NumPy reference compute identical outputs on every input, for random
networks and data, the digits model, and a user's own 28x28, 10-class data set. (The generated C equals
the reference bit for bit: tests/export/test_c_compile.py; onnxruntime: tests/export/test_onnx.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit.runtime as rt
from fixtures.int8nets import nets, prune_random, randomize_bn
from prunekit.artifact import load_artifact, save_artifact
from prunekit.data import load_splits
from prunekit.errors import PrunekitError
from prunekit.export.c import build
from prunekit.files import safetensors_metadata
from prunekit.models import build_model
from prunekit.quant.glue import QuantizedAdd, QuantizedGlobalAvgPool, QuantizeInput
from prunekit.quant.graph import integer_plan
from prunekit.quant.ptq import convert, int8_plan, plain_copy, quantize


def sparse_always(monkeypatch) -> None:
    """Make runtime.compile pick a sparse int8 kernel for every layer it can (they must all be exact)."""
    import prunekit.runtime.compiler as compiler

    monkeypatch.setattr(
        compiler,
        "_time",
        lambda fns, **kw: ({n: (1e9 if n == "dense" else 1.0) for n in fns}, {n: 0.0 for n in fns}),
    )


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).reshape(len(x), -1)


def reference(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The C export's NumPy reference, its int32 outputs at the output scale (float32, as PyTorch's).
    Below 2**24 (up to twice the calibrated range) float32(q) * scale is one-to-one, so equal outputs are
    equal integers; beyond it they are equal as the float32 values PyTorch returns."""
    cm = build(q, x)
    ints = cm.run_reference(x)
    scale = torch.tensor(cm.graph.buffers["output"].scale, dtype=torch.float32)
    return torch.from_numpy(ints.astype(np.float32)) * scale


def head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the final layer reads (the integer graph's last int8 tensor when that layer is float)."""
    seen = []
    last = [m for m in model.modules() if len(list(m.children())) == 0 and hasattr(m, "in_features")][-1]
    handle = last.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        outputs(model, x)
    finally:
        handle.remove()
    return seen[0]


def agree_everywhere(q: nn.Module, x: torch.Tensor, monkeypatch, c: bool = True) -> None:
    """Identical outputs; ``c=False``: a float classifier, which the runtime may run on its float kernels
    (equal within float rounding, not bit for bit), so what it reads is compared instead."""
    want = outputs(q, x)

    def same(compiled: nn.Module) -> None:
        if c:
            assert torch.equal(outputs(compiled, x), want)
        else:
            assert torch.equal(head_input(compiled, x), head_input(q, x))
            assert torch.allclose(outputs(compiled, x), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))

    same(rt.compile(q, x[:2], budget_s=0.01, min_reps=1, max_reps=2))
    sparse_always(monkeypatch)
    same(rt.compile(q, x[:2]))
    if c:
        assert torch.equal(reference(q, x), want)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nets(), st.integers(0, 2**16), st.booleans())
def test_random_networks_agree_on_random_data(monkeypatch, net, seed, head):
    model, shape, sparsity, _ = net
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model)
    prune_random(model, sparsity, gen)
    x = torch.randn((16, *shape), generator=gen) * 3
    result = quantize(model, calibration=[x], classifier=head)
    assert result.integer, result.integer_reason
    far = torch.randn((16, *shape), generator=gen) * 6  # beyond the calibration range: saturation too
    with monkeypatch.context() as mp:
        agree_everywhere(result.model, torch.cat([x, far]), mp, c=head)


def digits_resnet(sparsity: float = 0.9, seed: int = 0, widths=(16, 32, 64)) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet-digits", {"in_channels": 1, "num_classes": 10, "widths": list(widths)})
    randomize_bn(model)
    prune_random(model, sparsity, torch.Generator().manual_seed(seed))
    return model.eval()


def digits_agree(monkeypatch, count: int | None) -> None:
    splits = load_splits("digits")
    x = torch.cat([splits.test[:][0], splits.val[:][0], splits.train[:][0]])[:count]
    model = digits_resnet() if count is None else digits_resnet(widths=[8, 16])
    q = quantize(model, calibration=[splits.train[:][0][:256]], classifier=True).model
    plan = integer_plan(q)
    assert {"QuantizeInput", "QuantizedAdd", "QuantizedGlobalAvgPool"} <= set(plan["ops"].values())
    agree_everywhere(q, x, monkeypatch)


def test_digits_images_identical(monkeypatch):
    digits_agree(monkeypatch, 120)


@pytest.mark.slow  # all 1,797 images through the demo's architecture, four ways: about 30 s
def test_digits_every_image_identical(monkeypatch):
    digits_agree(monkeypatch, None)


def user_npz(path, n: int = 600, seed: int = 0):
    """A user's own 28x28, 10-class data set: each class a blurred random template, plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, n)
    x = templates[y] * 2 + rng.normal(0, 0.7, (n, 1, 28, 28)).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def users_data_agree(tmp_path, monkeypatch, count: int | None) -> None:
    splits = load_splits("npz", user_npz(tmp_path / "mine.npz", n=600 if count is None else 200))
    calib = splits.train[:][0][:128]
    model = digits_resnet() if count is None else digits_resnet(widths=[8, 16])
    q = quantize(model, calibration=[calib], classifier=True).model
    x = torch.cat([splits.test[:][0], splits.val[:][0]])[:count]
    agree_everywhere(q, x, monkeypatch)


def test_a_users_28x28_data_set_images_identical(tmp_path, monkeypatch):
    users_data_agree(tmp_path, monkeypatch, 60)


@pytest.mark.slow  # 240 images at 28x28 through the demo's architecture, four ways
def test_a_users_28x28_data_set_every_image_identical(tmp_path, monkeypatch):
    users_data_agree(tmp_path, monkeypatch, None)


def version(path) -> int:
    return json.loads(safetensors_metadata(path)["prunekit"])["format_version"]


def test_the_integer_model_stays_the_model_and_reloads_identically(tmp_path):
    x = torch.randn(32, 1, 8, 8)
    model = digits_resnet()
    q = quantize(model, calibration=[x], classifier=True).model
    assert type(q).__name__ == type(model).__name__ and isinstance(q, type(model))
    assert isinstance(q.layers[0].conv1, nn.Module) and isinstance(q.int8_ops.add, QuantizedAdd)
    assert isinstance(q.int8_ops.x, QuantizeInput) and isinstance(q.int8_ops.pool, QuantizedGlobalAvgPool)
    path = tmp_path / "q.safetensors"
    save_artifact(path, q, model_info={"name": "resnet-digits", "args": {"in_channels": 1}})
    again, info = load_artifact(path)
    assert version(path) == 3 and info.int8["graph"] == integer_plan(q)
    assert int8_plan(again) == int8_plan(q)
    assert torch.equal(outputs(again, x), outputs(q, x))


def test_a_layerwise_int8_model_loads_and_the_c_export_says_how_to_fix_it(tmp_path):
    """A file from before the one arithmetic (format 2: int8 layers with float outputs) still loads."""
    x = torch.randn(32, 1, 8, 8)
    model = digits_resnet()
    from prunekit.quant.ptq import calibrate, choose_layers

    work = plain_copy(model).eval()
    layers, _ = choose_layers(work, classifier=True)
    old = convert(work, "static", layers, calibrate(work, layers, [x])).model
    path = tmp_path / "old.safetensors"
    save_artifact(path, old, model_info={"name": "resnet-digits", "args": {"in_channels": 1}})
    again, info = load_artifact(path)
    assert version(path) == 2 and "graph" not in info.int8
    assert torch.equal(outputs(again, x), outputs(old, x))
    with pytest.raises(PrunekitError, match="not an integer INT8 model.*written before"):
        build(again, x)


def test_where_float_stays():
    """The classifier left float: the integer graph ends at the pooled features, which the float Linear
    reads as their dequantized values; a model that does not trace keeps int8 layers with float outputs."""
    x = torch.randn(32, 1, 8, 8)
    result = quantize(digits_resnet(), calibration=[x])  # classifier float (the default)
    q = result.model
    assert result.integer and isinstance(q.fc, nn.Linear)
    pooled = {}
    q.fc.register_forward_pre_hook(lambda m, a: pooled.update(x=a[0]))
    outputs(q, x)
    s = q.int8_ops.pool.scale_out
    assert torch.equal(torch.round(pooled["x"] / s) * s, pooled["x"])  # on the int8 grid
    assert all(m.integer_output and not m.wide for n, m in q.named_modules() if hasattr(m, "out_scale"))

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > -1e9 else x  # control flow on values: no fx trace

    result = quantize(Untraceable(), calibration=[torch.randn(8, 4)], classifier=True)
    assert not result.integer and "trace" in result.integer_reason
    assert not result.model.a.integer_output  # float outputs: y = float32(acc) * (s_x * s_w) + bias
