"""INT8 after pruning: the arithmetic against its definition, conversion (zeros stay zero, BN folding,
static vs dynamic, close to float), QAT that keeps masks, bad input, and bit-identical artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import prunekit.quant.fake
from prunekit.analysis import count_params, layer_table
from prunekit.artifact import inspect_artifact, load_artifact, read_artifact, save_artifact
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks, get_masks, weight_parameter
from prunekit.models import build_model
from prunekit.quant.fake import FakeQuantWeight, strip_qat
from prunekit.quant.fold import find_conv_bn, fold_conv_bn
from prunekit.quant.layers import QuantizedConv2d, QuantizedLinear
from prunekit.quant.ptq import (
    CLASSIFIER_REASON,
    FoldedBatchNorm,
    calibrate,
    int8_plan,
    quantize,
    quantize_model,
)
from prunekit.quant.qat import convert_qat, prepare_qat
from prunekit.quant.rounding import activation_scale, quantize_activation
from prunekit.structured.mha import HeadPrunedMultiheadAttention

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


def test_dynamic_and_calibrated_scales_follow_one_rule():
    """quantize_activation (dynamic) and ptq.calibrate (static) both take activation_scale of max|x|."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g) * 7
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # everything after the ReLU is exactly zero
    scales = calibrate(model, ["0", "2"], [x])
    top = x.abs().amax()
    assert torch.equal(activation_scale(top), top / 127.0) and torch.equal(scales["0"], activation_scale(top))
    assert torch.equal(quantize_activation(x)[1], scales["0"])
    assert float(activation_scale(torch.zeros(()))) == 1.0 and float(scales["2"]) == 1.0
    assert torch.equal(quantize_activation(torch.zeros(2, 3))[1], scales["2"])


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


def every_batchnorm_is_accounted_for(model: nn.Module, result) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in names:
        assert (name in result.folded) != (name in result.left_float), name
    for name, reason in result.left_float.items():
        if name in names:
            assert reason.startswith("BatchNorm kept float: "), (name, reason)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exclude": ["stem.0"]},
        {"exclude": ["layers.1.*"]},
        {"include": ["layers.0.conv1", "fc"], "classifier": True},
        {"types": ["Linear"], "classifier": True},
    ],
)
def test_a_batchnorm_whose_convolution_stays_float_is_reported(kwargs):
    model = tiny()
    result = quantize(model, activations="dynamic", **kwargs)
    every_batchnorm_is_accounted_for(model, result)
    for bn_name, reason in result.left_float.items():
        if "its convolution" in reason:
            conv = reason.split("'")[1]
            assert conv in result.left_float and conv not in result.int8, (bn_name, reason)
    if "exclude" in kwargs and kwargs["exclude"] == ["stem.0"]:
        assert result.left_float["stem.1"] == "BatchNorm kept float: its convolution 'stem.0' stays float"
    every_batchnorm_is_accounted_for(model, quantize(model, calibration=batches()))  # all converted
    x = batches(1)[0]
    with torch.no_grad():  # an unfolded BatchNorm after a float convolution still runs
        y, yq = model(x), result.model(x)
    assert (y - yq).abs().max() <= FLOAT_TOLERANCE * y.abs().max()


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


# ------------------------------------------------------------- modules that read their layers' weights


class Attention(nn.Module):
    """Every PyTorch module whose forward reads its Linear children's weights (the fused fast path)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.pruned = HeadPrunedMultiheadAttention(16, 2, batch_first=True)
        self.mid = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.decoder(self.encoder(h), h)
        h = self.attn(h, h, h, need_weights=False)[0]
        h = self.pruned(h, h, h, need_weights=False)[0]
        return self.fc(self.mid(h).mean(1))


def attention_data(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 5, 4, generator=g) for _ in range(n)]


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_linears_inside_transformer_layers_and_attention_stay_float_and_the_model_runs(activations):
    torch.manual_seed(0)
    model = Attention().eval()
    data = attention_data()
    result = quantize(model, activations=activations, calibration=data)
    assert result.int8 == ["embed", "mid"]
    owners = {  # each Linear that stays float -> the innermost module that reads its weight
        "encoder.self_attn.out_proj": ("MultiheadAttention", "encoder.self_attn"),
        "encoder.linear1": ("TransformerEncoderLayer", "encoder"),
        "encoder.linear2": ("TransformerEncoderLayer", "encoder"),
        "decoder.self_attn.out_proj": ("MultiheadAttention", "decoder.self_attn"),
        "decoder.multihead_attn.out_proj": ("MultiheadAttention", "decoder.multihead_attn"),
        "decoder.linear1": ("TransformerDecoderLayer", "decoder"),
        "decoder.linear2": ("TransformerDecoderLayer", "decoder"),
        "attn.out_proj": ("MultiheadAttention", "attn"),
        "pruned.out_proj": ("HeadPrunedMultiheadAttention", "pruned"),
    }
    assert result.left_float.keys() == {*owners, "fc"}
    for name, (kind, owner) in owners.items():
        assert result.left_float[name].startswith(f"inside {kind} '{owner}', whose forward reads"), name
        assert type(result.model.get_submodule(name)) is type(model.get_submodule(name)), name
    assert result.left_float["fc"] == CLASSIFIER_REASON
    with torch.no_grad():  # eval + no_grad: the fused fast path, which reads linear1.weight directly
        for x in data:
            y, yq = model(x), result.model(x)
            assert (y - yq).abs().max() <= FLOAT_TOLERANCE * y.abs().max()


def test_qat_leaves_linears_inside_transformer_layers_alone():
    torch.manual_seed(0)
    model = Attention().eval()
    data = attention_data()
    assert prepare_qat(model, calibration=data) == ["embed", "mid"]
    assert not parametrize.is_parametrized(model.encoder.linear1)
    with torch.no_grad():
        fake = model(data[0])
    result = convert_qat(model, example=data[0])
    assert result.int8 == ["embed", "mid"] and result.left_float["fc"] == CLASSIFIER_REASON
    assert result.left_float["encoder.linear1"].startswith("inside TransformerEncoderLayer 'encoder'")
    with torch.no_grad():
        torch.testing.assert_close(result.model(data[0]), fake, rtol=1e-4, atol=1e-4)


class ReadsWeight(nn.Module):
    """A user module that calls its child and also uses the child's weight directly (as weight tying or a
    fused op does): calibration sees the child run, so it is converted."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) + nn.functional.linear(x, self.inner.weight.T)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_a_forward_that_reads_an_int8_layers_weight_is_a_one_line_error(activations):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), ReadsWeight(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    with pytest.raises(PrunekitError) as info:
        quantize(model, activations=activations, calibration=[x], example=x)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "the int8 model fails on a test run in '1' (ReadsWeight)"
    )
    assert "'QuantizedLinear' object has no attribute 'weight'" in message and "exclude=" in message
    assert isinstance(quantize_model(model, calibration=[x], exclude=["1.inner"])[1].inner, nn.Linear)
    model = nn.Sequential(nn.Linear(4, 4), ReadsWeight(), nn.Linear(4, 2)).eval()
    prepare_qat(model, activations=activations, calibration=[x])
    with pytest.raises(PrunekitError, match="in '1' \\(ReadsWeight\\)"):
        convert_qat(model, example=x)
    assert isinstance(convert_qat(model).model[1].inner, QuantizedLinear)  # no example, no check


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
    # one reason for the classifier, whichever way the model was converted
    assert result.left_float["fc"] == CLASSIFIER_REASON == quantize(model, calibration=data).left_float["fc"]


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
    save_artifact(tmp_path / "float.safetensors", model, model_info=INFO)
    dense = read_artifact(tmp_path / "float.safetensors")[0]

    def nbytes(ts: dict) -> int:  # the tensors (this tiny model's file is mostly per-tensor headers)
        return sum(t.numel() * t.element_size() for t in ts.values())

    assert nbytes(tensors) < 0.5 * nbytes(dense)  # int8 weights, no mask, no BatchNorm statistics


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_a_qat_prepared_model_is_not_saved(tmp_path, activations):
    model = tiny()
    masks = magnitude_masks(model)
    apply_masks(model, masks)
    prepare_qat(model, activations=activations, calibration=batches(2))
    with torch.no_grad():
        for m in model.modules():  # latent weights that are visibly off the int8 grid
            if isinstance(m, nn.Conv2d):
                weight_parameter(m).mul_(1.0 + 1e-3)
    latent = {n: weight_parameter(model.get_submodule(n)).detach().clone() for n in masks}
    path = tmp_path / "qat.safetensors"
    with pytest.raises(PrunekitError) as info:
        save_artifact(path, model, model_info=INFO)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot save a QAT-prepared model")
    assert "'stem.0'" in message and "convert_qat(model) first" in message
    assert "prunekit.quant.fake.strip_qat(model)" in message and callable(prunekit.quant.fake.strip_qat)
    assert not path.exists()
    save_artifact(path, convert_qat(model).model, model_info=INFO)  # the int8 model saves
    assert load_artifact(path)[1].int8 is not None
    strip_qat(model)  # the float model saves too, with its latent weights and masks
    save_artifact(path, model, model_info=INFO)
    again, info = load_artifact(path)
    assert info.int8 is None and info.masks.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(info.masks[name], mask)
        assert torch.equal(weight_parameter(again.get_submodule(name)), latent[name]), name


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


class Lookup(nn.Module):
    """Not an int8 layer, though it has an int8 buffer named weight_q (a user's own lookup table)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight_q", torch.ones(4, 4, dtype=torch.int8))
        self.proj = nn.Linear(4, 2)

    def forward(self, x):
        return self.proj(x)


def test_int8_layers_are_found_by_type_not_by_a_buffer_name():
    model = Lookup()
    assert count_params(model)["params"] == 4 * 2 + 2  # the buffer is not a parameter
    assert [r["layer"] for r in layer_table(model)] == ["proj"]
    q = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), activations="dynamic")
    assert count_params(q)["params"] == 4 * 4 + 4 + 4 * 2 + 2
    assert [(r["layer"], r["type"]) for r in layer_table(q)] == [("0", "QuantizedLinear"), ("1", "Linear")]


def test_the_conversion_check_runs_without_autograd():
    from prunekit.quant.ptq import check_runs

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return x

    check_runs(Probe(), torch.zeros(1))
    assert seen == [False]
