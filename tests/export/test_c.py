"""C export, the Python side: fixed-point arithmetic, sparse storage, arena layout, scales, errors.

The generated C itself is compiled and compared bit for bit in test_export_c_compile.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.export.c import build, export_c
from prunekit.export.c.budget import lifetimes, plan_arena
from prunekit.export.c.storage import choose, decode, encode, sizes
from prunekit.quant.ptq import quantize


# -- storage ------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 700),
    st.floats(0, 1),
    st.integers(0, 2**31 - 1),
)
def test_storage_round_trips_and_counts_bytes(rows, cols, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, size=(rows, cols)).astype(np.int8)
    w[rng.random((rows, cols)) > density] = 0
    nnz = int((w != 0).sum())
    for fmt in ("dense", "csr8", "csr16"):
        stored = encode(w, fmt)
        np.testing.assert_array_equal(decode(stored, w.shape), w)
    s = sizes(w)
    ptr = 2 if nnz < 2**16 else 4
    assert s["dense"] == rows * cols
    assert s["csr16"] == 3 * nnz + ptr * (rows + 1)
    pads = sum(
        sum((int(b) - int(a) - 1) // 255 for a, b in zip(np.r_[0, c[:-1]], c))
        + (int(c[0]) // 255 if len(c) else 0)
        for c in (np.flatnonzero(r) for r in w)
    )
    assert s["csr8"] >= 2 * nnz + ptr * (rows + 1)
    assert s["csr8"] <= 2 * (nnz + pads + rows * (cols // 255 + 1)) + 4 * (rows + 1)
    best, _ = choose(w, "auto")
    assert best.nbytes == min(v for v in s.values() if v is not None)
    assert choose(w, "never")[0].fmt == "dense"
    assert choose(w, "always")[0].fmt in ("csr8", "csr16")


def test_storage_mode_is_checked():
    with pytest.raises(PrunekitError, match="--sparse must be one of auto, always, never"):
        choose(np.zeros((2, 2), np.int8), "sometimes")


# -- models -------------------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = F.relu(self.c2(h) + h)
        return self.fc(self.pool(h).flatten(1))


def _int8(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return quantize(model, calibration=[x], classifier=True, **kw).model


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 6, 6)
    return _int8(Residual(), x), x


def test_scales_and_constants_come_from_the_int8_model(residual):
    q, x = residual
    g = build(q, x).graph
    convs = [op for op in g.ops if op.kind == "conv"]
    # each int8 layer reads a buffer at exactly its own act_scale and writes at its own out_scale, with
    # its own constants: the export chooses nothing
    for op, name in zip(convs, ("c1", "c2", "fc")):
        m = q.get_submodule(name)
        assert g.buffers[op.inputs[0]].scale == float(m.act_scale)
        assert g.buffers[op.output].scale == float(m.out_scale)
        np.testing.assert_array_equal(op.arrays["mult"], m.out_mult.numpy())
        np.testing.assert_array_equal(op.arrays["bias"], m.bias_q.long().numpy() * m.out_mult.long().numpy())
    add = next(op for op in g.ops if op.kind == "add")
    assert [add.params[k] for k in ("ma", "mb", "shift")] == q.int8_ops.add.consts.tolist()
    # BatchNorm folded, ReLUs fused: conv, conv, add (+relu), gap, fc
    assert [op.kind for op in g.ops] == ["conv", "conv", "add", "avgpool", "conv"]
    assert g.ops[0].lo == 0 and g.ops[1].lo == -127 and g.ops[2].lo == 0 and g.buffers["output"].wide


def reference_equals_torch(q: nn.Module, cm, x: torch.Tensor) -> None:
    """The NumPy reference's int32 outputs, at the output scale, are the PyTorch int8 model's outputs."""
    ref = cm.run_reference(x)
    scale = torch.tensor(cm.graph.buffers["output"].scale, dtype=torch.float32)
    with torch.no_grad():
        want = q(x)
    assert torch.equal(torch.from_numpy(ref.astype(np.float32)) * scale, want.reshape(len(x), -1))
    assert np.abs(ref).max() < 2**24  # so float32(q) * scale is one-to-one: the integers are equal too


def test_reference_is_the_pytorch_model(residual):
    q, x = residual
    reference_equals_torch(q, build(q, x), x)
    far = torch.randn(64, 1, 6, 6) * 5  # far outside the calibration range: saturation agrees too
    reference_equals_torch(q, build(q, x), far)


def test_arena_never_overlaps_live_buffers(residual):
    q, x = residual
    g = build(q, x).graph
    offsets, total = plan_arena(g)
    life = lifetimes(g)
    names = list(offsets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (a0, a1), (b0, b1) = life[a], life[b]
            if a1 < b0 or b1 < a0:
                continue
            ra = (offsets[a], offsets[a] + g.buffers[a].nbytes)
            rb = (offsets[b], offsets[b] + g.buffers[b].nbytes)
            assert ra[1] <= rb[0] or rb[1] <= ra[0], (a, b)
    assert total >= max(g.buffers[n].nbytes for n in names)
    assert all(off % 4 == 0 for off in offsets.values())


def test_errors_name_the_problem(residual, tmp_path):
    q, x = residual
    float_model = Residual().eval()
    with pytest.raises(PrunekitError, match="not quantized.*classifier: true"):
        build(float_model, x)
    head_float = quantize(Residual().eval(), calibration=[x]).model
    with pytest.raises(PrunekitError, match=r"layer 'fc' \(Linear\) is float32.*classifier"):
        build(head_float, x)
    dynamic = quantize(Residual().eval(), activations="dynamic", classifier=True).model
    with pytest.raises(PrunekitError, match="not an integer INT8 model.*dynamic activations"):
        build(dynamic, x)

    class Sig(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid())

        def forward(self, x):
            return self.body(x).flatten(1)

    sig = quantize(Sig().eval(), calibration=[x], classifier=True).model
    with pytest.raises(PrunekitError, match=r"unsupported operator Sigmoid at 'body.1'"):
        build(sig, x)
    out = tmp_path / "c"
    with pytest.raises(PrunekitError, match="output buffer alone is 288 bytes, over --ram-limit 100"):
        export_c(q, out, calibration=x, ram_limit=100)
    with pytest.raises(PrunekitError, match="bytes of flash.*over --flash-limit 10"):
        export_c(q, out, calibration=x, flash_limit=10)
    with pytest.raises(PrunekitError, match="--name must be a C identifier"):
        export_c(q, out, calibration=x, name="9lives")
    assert not out.exists()  # nothing half-written


def test_budget_sums_and_sparse_choice(residual):
    q, x = residual
    dense = build(q, x, sparse="never").budget
    auto = build(q, x, sparse="auto").budget
    for b in (dense, auto):
        assert b["flash"]["weights"] == sum(r["weight_bytes"] for r in b["layers"])
        assert (
            b["flash"]["total"]
            == b["flash"]["weights"] + b["flash"]["constants"] + b["flash"]["code_estimate"]
        )
        assert b["ram"]["total"] == b["ram"]["arena"] + b["ram"]["scratch"]
    assert dense["flash"]["weights"] == dense["flash"]["weights_if_dense"] == 8 * 9 + 8 * 72 + 4 * 8
    assert auto["flash"]["weights"] <= dense["flash"]["weights"]
    assert auto["ram"] == dense["ram"]


def test_recipe_refuses_a_c_export_of_a_float_model_before_training():
    import yaml

    from prunekit.jobs import recipe

    text = """
model: {builtin: resnet-digits}
stages:
  - {type: train, epochs: 1, lr: 0.05}
  - {type: quantize, activations: static}
  - {type: export, name: m, c: true}
"""
    with pytest.raises(PrunekitError, match=r"stages\[2\]: export 'c: true' needs .* classifier: true"):
        recipe.from_dict(yaml.safe_load(text))
    ok = recipe.from_dict(yaml.safe_load(text.replace("static}", "static, classifier: true}")))
    assert ok.stages[-1].c is True
