"""INT8 after pruning: the arithmetic against its definition, conversion (zeros stay zero, BN folding,
static vs dynamic, close to float), QAT that keeps masks, bad input, and bit-identical artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.analysis import count_params, layer_table
from prunekit.artifact import inspect_artifact, load_artifact, read_artifact, save_artifact
from prunekit.errors import PrunekitError
from prunekit.fold import find_conv_bn, fold_conv_bn
from prunekit.masking import apply_masks, get_masks, weight_parameter
from prunekit.models import build_model
from prunekit.ptq import FoldedBatchNorm, int8_plan, quantize
from prunekit.qat import FakeQuantWeight, convert_qat, prepare_qat
from prunekit.quantize import QuantizedConv2d, QuantizedLinear, quantize_activation, quantize_model

# conversion is "close to float" when no logit moves by more than this fraction of the largest |logit|:
# 8-bit rounding of weights and activations through 5-7 layers costs about 1%
FLOAT_TOLERANCE = 0.03
ARGS = {"in_channels": 1, "num_classes": 10, "widths": [8, 16], "blocks": 1}
INFO = {"name": "resnet-digits", "args": ARGS}


def trained_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (no training needed)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return trained_stats(build_model("resnet-digits", dict(ARGS)), seed)


def magnitude_masks(model: nn.Module, sparsity: float = 0.7) -> dict[str, torch.Tensor]:
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().abs()
            k = round(sparsity * w.numel())
            threshold = w.reshape(-1).kthvalue(k).values
            masks[name] = w > threshold
    return masks


def batches(n: int = 3, size: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 1, 8, 8, generator=g) * 16 for _ in range(n)]


# ------------------------------------------------------------------------------------- the arithmetic


def test_per_channel_scale_and_rounding_follow_the_definition():
    linear = nn.Linear(4, 2)
    w = torch.tensor([[0.5, -1.27, 0.0, 0.3], [2.54, 0.062, -0.1, 0.0]])
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(torch.tensor([0.1, -0.2]))
    layer = QuantizedLinear(linear)
    wd = w.double().numpy()
    scale = np.abs(wd).max(axis=1) / 127  # s_w = max|w_row| / 127
    assert layer.weight_q.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    np.testing.assert_allclose(layer.weight_scale.numpy(), scale, rtol=1e-7)
    np.testing.assert_array_equal(layer.weight_q.numpy(), np.round(wd / scale[:, None]))
    assert layer.weight_q.tolist() == [[50, -127, 0, 30], [127, 3, -5, 0]]  # by hand (no .5 ties)
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    xq, s_x = quantize_activation(x)
    assert s_x == torch.tensor(1 / 127, dtype=torch.float32) and xq.tolist() == [[127, -64, 32, 0]]
    acc = xq.double() @ layer.weight_q.double().T  # the exact integer dot product
    expected = acc.float() * (s_x * layer.weight_scale) + layer.bias
    assert torch.equal(layer(x), expected)
    np.testing.assert_allclose(layer(x).numpy(), (x @ w.T + linear.bias).detach().numpy(), atol=0.02)


def test_static_scale_clamps_and_an_all_zero_input_gets_scale_one():
    xq, s = quantize_activation(torch.tensor([3.0, -3.0, 0.5]), torch.tensor(0.01))
    assert xq.tolist() == [127, -127, 50] and float(s) == pytest.approx(0.01)
    xq, s = quantize_activation(torch.zeros(3))
    assert float(s) == 1.0 and xq.tolist() == [0, 0, 0]


# -------------------------------------------------------------------------------------- BN folding


def test_folding_is_exact_within_float_tolerance_including_negative_gamma():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
    trained_stats(nn.Sequential(conv, bn))
    with torch.no_grad():
        bn.weight[::2] *= -1  # negative gammas flip the channel's sign
    x = torch.randn(4, 3, 5, 5)
    w, b = fold_conv_bn(conv.weight, conv.bias, bn)
    with torch.no_grad():
        expected = bn(conv(x))
        folded = nn.functional.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)


class SharedOutput(nn.Module):
    """conv1's output goes to bn1 and to the sum: folding bn1 into conv1 would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv1(x)
        y = self.bn1(y) + y
        return self.fc(self.bn2(self.conv2(y)).mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = self.bn(self.conv(y))
        return self.fc(y.mean((2, 3)))


def test_only_safe_pairs_are_folded_and_the_model_stays_equal():
    torch.manual_seed(0)
    model = trained_stats(SharedOutput())
    pairs, kept = find_conv_bn(model)
    assert pairs == {"conv2": "bn2"} and "bn1" in kept
    fallback = trained_stats(Untraceable())
    pairs, kept = find_conv_bn(fallback)
    assert pairs == {"body.0": "body.1"} and "bn" in kept  # nn.Sequential neighbours only
    for m in (model, fallback):
        x = batches(2, 8)
        result = quantize(m, calibration=x)
        assert isinstance(result.model.get_submodule(next(iter(result.folded))), FoldedBatchNorm)
        with torch.no_grad():
            y, yq = m(x[0]), result.model(x[0])
        # folding bn1 into conv1 would change the residual sum by far more than int8 rounding
        assert (y - yq).abs().max() <= FLOAT_TOLERANCE * y.abs().max()


# ------------------------------------------------------------------------------------------ conversion


def test_pruned_zeros_are_exactly_the_zeros_of_weight_q():
    model = tiny()
    masks = magnitude_masks(model)
    apply_masks(model, masks)
    result = quantize(model, calibration=batches())
    assert get_masks(model).keys() == masks.keys()  # the original keeps its masks and float layers
    assert isinstance(model.stem[0], nn.Conv2d) and not isinstance(model.stem[0], QuantizedConv2d)
    for name, mask in masks.items():
        q = result.model.get_submodule(name).weight_q
        assert int((q == 0).sum()) == int((~mask).sum()), name
        assert torch.equal(q == 0, ~mask), name
    rows = {r["layer"]: r for r in layer_table(result.model)}
    assert rows["stem.0"]["type"] == "QuantizedConv2d" and rows["fc"]["type"] == "Linear"
    assert rows["stem.0"]["nonzero"] == int(masks["stem.0"].sum())


def test_static_calibrates_max_abs_input_and_dynamic_needs_no_data():
    model, data = tiny(), batches()
    static = quantize(model, activations="static", calibration=[(x, torch.zeros(len(x))) for x in data])
    top = max(float(x.abs().max()) for x in data)
    assert float(static.model.stem[0].act_scale) == pytest.approx(top / 127, rel=1e-6)
    dynamic = quantize_model(model, activations="dynamic")
    assert all(m.act_scale is None for m in dynamic.modules() if isinstance(m, QuantizedConv2d))
    x = data[0]
    with torch.no_grad():
        y, ys, yd = model(x), static.model(x), dynamic(x)
    for out in (ys, yd):
        assert (out - y).abs().max() <= FLOAT_TOLERANCE * y.abs().max()
    assert not torch.equal(ys, yd)  # per-call scales differ from the calibrated ones
    assert static.left_float == {"fc": "final classifier (float32 by default; classifier=True makes it int8)"}
    assert isinstance(quantize_model(model, calibration=data, classifier=True).fc, QuantizedLinear)


def test_calibration_batches_limits_the_data_used():
    model = tiny()
    data = batches(3)
    data[2] = data[2] * 10  # only seen when all three batches are used
    few = quantize(model, calibration=data, calibration_batches=2).model
    every = quantize(model, calibration=data, calibration_batches=None).model
    assert float(every.stem[0].act_scale) == pytest.approx(10 * float(few.stem[0].act_scale), rel=0.2)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"activations": "int4"}, "activations must be one of static, dynamic, got 'int4'"),
        ({"activations": "statc"}, "did you mean 'static'"),
        ({}, "activations 'static' needs calibration data"),
        ({"calibration": []}, "calibration is empty"),
        ({"calibration": [[1, 2]]}, "calibration batches must be tensors"),
        ({"calibration": batches(1), "calibration_batches": 0}, "calibration_batches must be >= 1"),
        ({"activations": "dynamic", "types": ["Conv3d"]}, "allowed: Linear, Conv2d"),
        ({"activations": "dynamic", "include": ["decoder.*"]}, "match no module"),
        ({"activations": "dynamic", "exclude": ["*"]}, "no layer to quantize"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, needle):
    with pytest.raises(PrunekitError, match=None) as info:
        quantize(tiny(), **kwargs)
    assert needle in str(info.value), str(info.value)


def test_an_int8_model_is_not_quantized_twice():
    q = quantize_model(tiny(), activations="dynamic")
    with pytest.raises(PrunekitError, match="already has int8 layers"):
        quantize(q, activations="dynamic")


# ------------------------------------------------------------------------------------------------- QAT


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_qat_keeps_masks_through_optimizer_steps_and_converts_to_what_was_trained(optimizer):
    model = tiny()
    masks = magnitude_masks(model)
    apply_masks(model, masks)
    data = batches(4)
    layers = prepare_qat(model, calibration=data[:2])
    assert "fc" not in layers and all(
        isinstance(model.get_submodule(n).parametrizations.weight[-1], FakeQuantWeight) for n in layers
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
        if optimizer == "sgd"
        else torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)
    )
    model.train()
    targets = torch.arange(32) % 10
    for x in data * 2:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), targets).backward()
        opt.step()
    after = get_masks(model)
    assert after.keys() == masks.keys() and all(torch.equal(after[n], masks[n]) for n in masks)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert bool((module.weight[~mask] == 0).all()) and bool((weight_parameter(module)[~mask] == 0).all())
    model.eval()
    result = convert_qat(model)
    for name, mask in masks.items():
        q = result.model.get_submodule(name).weight_q
        # every pruned weight is 0; a kept weight that training moved below half a step may round to 0 too
        assert bool((q[~mask] == 0).all()) and int((q[mask] == 0).sum()) <= 0.02 * int(mask.sum()), name
    with torch.no_grad():
        trained, converted = model(data[0]), result.model(data[0])
    # same integers and scales; only float32 summation order differs from the fake-quant forward
    torch.testing.assert_close(converted, trained, rtol=1e-4, atol=1e-4 * float(trained.abs().max()))
    assert isinstance(model.stem[0].parametrizations.weight[-1], FakeQuantWeight)  # the QAT model is intact
    assert result.left_float["fc"].startswith("final classifier")


def test_qat_needs_data_for_static_and_refuses_a_second_prepare():
    model = tiny()
    with pytest.raises(PrunekitError, match="needs calibration data"):
        prepare_qat(model)
    prepare_qat(model, activations="dynamic")
    with pytest.raises(PrunekitError, match="already prepared"):
        prepare_qat(model, activations="dynamic")
    with pytest.raises(PrunekitError, match="not prepared for QAT"):
        convert_qat(tiny())
    result = convert_qat(model)
    assert result.activations == "dynamic"


# ----------------------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_int8_artifact_reloads_bit_identical(tmp_path, activations):
    model = tiny()
    apply_masks(model, magnitude_masks(model))
    q = quantize_model(model, activations=activations, calibration=batches())
    path = tmp_path / "int8.safetensors"
    size = save_artifact(path, q, model_info=INFO)
    tensors, info = read_artifact(path)
    assert info.int8 == int8_plan(q) and tensors["stem.0.weight_q"].dtype == torch.int8
    assert "stem.0.weight" not in tensors and not info.masks
    again, _ = load_artifact(path)
    state, reloaded = q.state_dict(), again.state_dict()
    assert state.keys() == reloaded.keys()
    assert all(torch.equal(state[k], reloaded[k]) and state[k].dtype == reloaded[k].dtype for k in state)
    x = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    rows, totals = inspect_artifact(path)
    assert (totals["params"], totals["nonzero"]) == (
        count_params(q)["params"],
        count_params(q)["nonzero_params"],
    )
    assert totals["size_bytes"] == size
    dense_size = save_artifact(tmp_path / "float.safetensors", model, model_info=INFO)
    assert size < 0.5 * dense_size  # int8 weights, no mask, no BatchNorm statistics


def test_an_int8_artifact_that_does_not_fit_is_a_clear_error(tmp_path):
    q = quantize_model(tiny(), activations="dynamic")
    path = tmp_path / "int8.safetensors"
    save_artifact(path, q, model_info=INFO)
    with pytest.raises(PrunekitError, match="int8 layers do not fit the model"):
        load_artifact(path, model=nn.Sequential(nn.Linear(2, 2)))


def test_parameter_counts_of_an_int8_model():
    model = tiny()
    q = quantize_model(model, activations="dynamic")
    folded_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert count_params(q)["params"] == count_params(model)["params"] - folded_channels
    # random-init weights below half a quantization step (max|w_row| / 254) round to zero: well under 1%
    assert 0.0 <= count_params(q)["sparsity"] < 0.01
