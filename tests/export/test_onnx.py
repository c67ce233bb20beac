"""ONNX export checked with onnxruntime: dense, masked (exact zeros survive, no mask ops) and structurally
pruned models (ResNet, MLP, a transformer encoder layer with heads removed), dynamic batch, atomic writes,
and the `prunekit export onnx` command on artifacts and `prunekit structured` output directories."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import numpy_helper  # noqa: E402

from prunekit import Sparsifier  # noqa: E402
from prunekit.artifact import save_artifact  # noqa: E402
from prunekit.cli.commands import app, main  # noqa: E402
from prunekit.errors import PrunekitError  # noqa: E402
from prunekit.export import export_onnx  # noqa: E402
from prunekit.masking import get_masks  # noqa: E402
from prunekit.models import MODELS, SmallResNet  # noqa: E402
from prunekit.structured import HeadPrunedMultiheadAttention, prune_model  # noqa: E402

WIDTHS = {"widths": [8, 16], "blocks": 1}


def tiny_resnet(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    model = SmallResNet(**WIDTHS).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them into the convs matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.layer(x))


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_dense_resnet_matches_pytorch_at_two_batch_sizes(tmp_path):
    model = tiny_resnet()
    report = export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "dense.onnx")
    assert report["verified"] and report["batch_sizes"] == [1, 3]
    assert report["max_abs_diff"] < 1e-5 and report["atol"] == 1e-5 and report["rtol"] == 1e-3
    assert report["opset"] >= 18 and report["exporter"] == "dynamo"
    # one self-contained file: the exporter's default side file (.onnx.data) is not written
    assert report["files"] == [str(tmp_path / "dense.onnx")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx"]
    assert report["size_bytes"] == (tmp_path / "dense.onnx").stat().st_size
    x = torch.randn(5, 1, 8, 8)  # a batch size neither exported nor verified
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "dense.onnx", x), expected, rtol=1e-4, atol=1e-5)


def test_masked_model_exports_plain_weights_with_the_exact_zeros(tmp_path):
    model = tiny_resnet()
    sparsifier = Sparsifier(model, 0.7, criterion="magnitude", group="global")
    sparsifier.prepare()
    sparsifier.prune(0.7)
    masks = get_masks(model)
    report = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "masked.onnx")
    z = report["zero_weights"]
    assert (
        z["preserved"]
        and z["onnx"] == z["model"]
        and z["model"] >= 0.69 * sum(m.numel() for m in masks.values())
    )
    proto = onnx.load(str(tmp_path / "masked.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert "Where" not in ops and not any(
        "mask" in t.name or "parametrizations" in t.name for t in proto.graph.initializer
    )
    weights = initializers(tmp_path / "masked.onnx")
    for name, mask in masks.items():  # BatchNorm is folded into the convs: values scale, zeros stay put
        np.testing.assert_array_equal(weights[f"{name}.weight"] != 0, mask.numpy(), err_msg=name)
    # the caller's model keeps its masks and stays trainable
    assert set(get_masks(model)) == set(masks)
    assert type(model.layers[0].conv1).__name__.startswith("Parametrized")


def test_structurally_pruned_resnet_is_smaller_and_matches(tmp_path):
    dense = tiny_resnet()
    pruned = copy.deepcopy(dense)
    prune_model(pruned, torch.randn(1, 1, 8, 8), ratio=0.5, round_to=4)
    report = export_onnx(pruned, torch.randn(1, 1, 8, 8), tmp_path / "pruned.onnx")
    assert report["max_abs_diff"] < 1e-5
    weights = initializers(tmp_path / "pruned.onnx")
    assert weights["layers.0.conv1.weight"].shape == (4, 4, 3, 3)  # 8 channels halved
    dense_bytes = sum(p.numel() * 4 for p in dense.parameters())
    assert sum(w.nbytes for w in weights.values()) < 0.35 * dense_bytes  # the file's weights are smaller


def test_structurally_pruned_mlp_with_static_batch(tmp_path):
    model = TinyMLP().eval()
    prune_model(model, torch.randn(1, 20), ratio=0.5, round_to=8)
    assert model.net[0].out_features == 32
    model.train()  # exported in eval mode, handed back in training mode
    report = export_onnx(model, torch.randn(4, 20), tmp_path / "mlp.onnx", dynamic_batch=False)
    assert report["batch_sizes"] == [4] and report["max_abs_diff"] < 1e-5
    assert all(m.training for m in model.modules())
    dims = onnx.load(str(tmp_path / "mlp.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 20]


def test_head_pruned_transformer_encoder_layer(tmp_path):
    model = Encoder().eval()
    prune_model(model, torch.randn(1, 6, 32), ratio=0.5, round_to=1)
    attn = model.layer.self_attn
    assert isinstance(attn, HeadPrunedMultiheadAttention) and attn.num_heads == 2
    # batch 1: torch.export would specialize it and bake it into a reshape; the export traces at 2
    report = export_onnx(model, torch.randn(1, 6, 32), tmp_path / "enc.onnx")
    assert report["batch_sizes"] == [1, 3] and report["max_abs_diff"] < 1e-4
    x = torch.randn(4, 6, 32)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "enc.onnx", x), model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_torchscript_exporter_and_external_data(tmp_path):
    model = tiny_resnet()
    ts = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "ts.onnx", exporter="torchscript")
    assert ts["exporter"] == "torchscript" and ts["max_abs_diff"] < 1e-5
    ext = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "ext.onnx", external_data=True)
    assert [p.rsplit("/", 1)[-1] for p in ext["files"]] == ["ext.onnx.data", "ext.onnx"]
    assert ext["size_bytes"] > (tmp_path / "ext.onnx").stat().st_size  # the weights are in the side file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_external_data_fsyncs_the_side_file_too(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_ino)  # a rename keeps the inode: compared with the final files
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "m.onnx"
    report = export_onnx(tiny_resnet(), torch.randn(2, 1, 8, 8), target, external_data=True)
    side = tmp_path / "m.onnx.data"
    assert report["files"] == [str(side), str(target)]
    assert {side.stat().st_ino, target.stat().st_ino} <= set(synced)


def test_a_single_file_export_removes_the_side_file_of_an_earlier_one(tmp_path):
    target = tmp_path / "m.onnx"
    export_onnx(tiny_resnet(), torch.randn(2, 1, 8, 8), target, external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    # the same name again in one file: the old side file would pass for this model's weights
    report = export_onnx(tiny_resnet(seed=1), torch.randn(2, 1, 8, 8), target)
    assert report["files"] == [str(target)] and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert report["size_bytes"] == target.stat().st_size
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(target, x), tiny_resnet(seed=1)(x).numpy(), rtol=1e-4, atol=1e-5)


def test_a_dynamic_int8_model_is_refused_up_front_with_a_one_line_hint(tmp_path):
    from prunekit.quant.ptq import quantize_model

    model = quantize_model(tiny_resnet(), activations="dynamic")
    with pytest.raises(PrunekitError) as info:
        export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "q.onnx")
    message = str(info.value)
    assert message.startswith("SmallResNet is an INT8 model with dynamic activations (stem.0, ")
    assert "activations='static'" in message
    assert "aten_amax" not in message and "try dynamic_batch" not in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


class TwoParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kept = nn.Parameter(torch.ones(3, 4))
        self.renamed = nn.Parameter(torch.ones(5, 4))
        with torch.no_grad():
            self.kept[0, :2] = 0  # 2 zeros
            self.renamed[:, 0] = 0  # 5 zeros
            self.renamed[0, 1] = 0  # 6 zeros


def inspect_with(tmp_path, model: nn.Module, initializers: dict[str, np.ndarray]) -> dict:
    """The exporter's zero accounting on a hand-built file holding ``initializers``."""
    from onnx import TensorProto, helper

    from prunekit.export.onnx import _inspect

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in initializers.items()],
    )
    path = tmp_path / "hand.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return _inspect(onnx, path, model, None, "dynamo")["zero_weights"]


def test_zero_weights_need_every_tensor_matched_not_only_the_total(tmp_path):
    model = TwoParams()
    kept, renamed = model.kept.detach().numpy(), model.renamed.detach().numpy()
    # "kept" gained 6 zeros, the renamed tensor lost all 6: the totals (8 and 8) hide the loss
    gained = kept.copy()
    gained.flat[2:8] = 0
    z = inspect_with(tmp_path, model, {"kept": gained, "onnx::MatMul_7": np.ones((5, 4))})
    assert z["model"] == z["onnx"] == 8
    assert z["preserved"] is False and z["unmatched"] == ["renamed"]
    # renamed with its values: matched by shape and values
    z = inspect_with(tmp_path, model, {"kept": kept, "onnx::MatMul_7": renamed})
    assert z["preserved"] is True and z["unmatched"] == [] and z["matched_renamed"] == ["renamed"]
    # renamed and scaled per row (a folded BatchNorm): matched by its zero positions
    z = inspect_with(tmp_path, model, {"kept": kept, "onnx::Gemm_3": renamed * np.arange(1, 6)[:, None]})
    assert z["preserved"] is True and z["matched_renamed"] == ["renamed"]
    # a tensor of the right shape with zeros elsewhere does not count
    elsewhere = np.ones((5, 4))
    elsewhere[:, 3], elsewhere[0, 2] = 0, 0
    z = inspect_with(tmp_path, model, {"kept": kept, "onnx::Gemm_3": elsewhere})
    assert z["preserved"] is False and z["unmatched"] == ["renamed"]
    # the same name with fewer zeros stays an error
    with pytest.raises(PrunekitError, match="lost exact zeros in kept"):
        inspect_with(tmp_path, model, {"kept": np.ones((3, 4)), "renamed": renamed})


def test_torchscript_renamed_folded_convs_count_as_preserved(tmp_path):
    model = tiny_resnet()
    sparsifier = Sparsifier(model, 0.5, criterion="magnitude")
    sparsifier.prepare()
    sparsifier.prune(0.5)
    report = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "ts.onnx", exporter="torchscript")
    z = report["zero_weights"]
    assert z["preserved"] and z["unmatched"] == [] and "stem.0.weight" in z["matched_renamed"]
    assert "stem.0.weight" not in initializers(tmp_path / "ts.onnx")  # renamed (and BatchNorm folded)


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x, y):
        return self.a(x), {"b": self.b(y), "none": None}


def test_several_inputs_and_nested_outputs(tmp_path):
    model = TwoInTwoOut().eval()
    example = (torch.randn(1, 4), torch.randn(1, 6))
    report = export_onnx(model, example, tmp_path / "m.onnx", input_names=["x", "y"], output_names=["a", "b"])
    assert report["batch_sizes"] == [1, 3] and set(report["max_abs_diff_per_output"]) == {"a", "b"}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    a, b = session.run(["a", "b"], {"x": np.ones((4, 4), np.float32), "y": np.ones((4, 6), np.float32)})
    assert a.shape == (4, 3) and b.shape == (4, 2)
    with pytest.raises(PrunekitError, match="dimension 0 of every input to be the batch"):
        export_onnx(model, (torch.randn(1, 4), torch.randn(2, 6)), tmp_path / "bad.onnx")
    report = export_onnx(
        model, (torch.randn(1, 4), torch.randn(2, 6)), tmp_path / "s.onnx", dynamic_batch=False
    )
    assert report["batch_sizes"] == [1] and report["max_abs_diff"] < 1e-5


class Noisy(nn.Module):
    """Random in its forward: onnxruntime draws other numbers, so verification must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + torch.rand_like(x)


def test_failed_verification_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(PrunekitError, match=r"output 'output' differs from PyTorch by up to"):
        export_onnx(Noisy(), torch.randn(2, 4), target)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous export")
    with pytest.raises(PrunekitError, match="differs from PyTorch"):
        export_onnx(Noisy(), torch.randn(2, 4), target)
    assert target.read_bytes() == b"previous export" and list(tmp_path.iterdir()) == [target]


def test_an_opset_the_exporter_cannot_reach_is_refused(tmp_path):
    with pytest.raises(PrunekitError, match="could not produce opset 13"):
        export_onnx(TinyMLP(), torch.randn(2, 20), tmp_path / "m.onnx", opset=13, verify=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exporter": "tflite"}, "exporter must be one of dynamo, torchscript"),
        ({"opset": "18"}, "opset must be an integer"),
        ({"atol": -1.0}, "atol must be a number >= 0"),
        ({"input_names": ["a", "b"]}, "input_names must be 1 distinct"),
        ({"output_names": ["y", "z"]}, "output_names must be 1 distinct"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(PrunekitError, match=message):
        export_onnx(TinyMLP(), torch.randn(2, 20), tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_example_inputs(tmp_path):
    with pytest.raises(PrunekitError, match="example_inputs must be a tensor or a tuple of tensors"):
        export_onnx(TinyMLP(), [1.0, 2.0], tmp_path / "m.onnx")
    with pytest.raises(PrunekitError, match="does not run on example_inputs"):
        export_onnx(TinyMLP(), torch.randn(2, 7), tmp_path / "m.onnx")
    with pytest.raises(PrunekitError, match="is a directory; give a file name"):
        export_onnx(TinyMLP(), torch.randn(2, 20), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_import_prunekit_does_not_import_onnx():
    import subprocess

    code = (
        "import sys, prunekit, prunekit.export, prunekit.cli.commands; "
        "print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- the command line ---------------------------------------------------------------------------------


def call_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["prunekit", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return (0 if info.value.code is None else info.value.code), captured.out, captured.err


@pytest.fixture
def artifact(tmp_path):
    model = tiny_resnet()
    sparsifier = Sparsifier(model, 0.5, criterion="magnitude")
    sparsifier.prepare()
    sparsifier.prune(0.5)
    path = tmp_path / "pruned.safetensors"
    save_artifact(path, model, model_info={"name": "resnet-digits", "args": WIDTHS})
    return path


def test_cli_exports_an_artifact_with_the_default_digits_shape(artifact, tmp_path):
    out = tmp_path / "out" / "pruned.onnx"
    result = CliRunner().invoke(app, ["export", "onnx", str(artifact), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"wrote {out}" in result.output and "opset" in result.output and "dynamic batch" in result.output
    assert "max abs diff" in result.output and "(preserved)" in result.output
    assert "[torch.onnx]" not in result.output  # the exporter's progress lines are not ours to print
    x = torch.randn(2, 1, 8, 8)
    from prunekit.artifact import load_artifact

    model, _ = load_artifact(artifact)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(out, x), model.eval()(x).numpy(), rtol=1e-4, atol=1e-5)
    result = CliRunner().invoke(
        app,
        [
            "export",
            "onnx",
            str(artifact),
            "--out",
            str(out),
            "--json",
            "--no-verify",
            "--static-batch",
            "--opset",
            "18",
        ],
    )
    report = json.loads(result.output)
    assert report["verified"] is False and report["dynamic_batch"] is False and report["opset"] == 18
    assert report["max_abs_diff"] is None
    assert report["zero_weights"]["model"] == report["zero_weights"]["onnx"] > 0


def test_cli_exports_a_structured_output_directory(tmp_path):
    from prunekit.jobs.structured import run_structured

    torch.manual_seed(0)
    run_structured(
        SmallResNet().eval(),
        torch.randn(1, 1, 8, 8),
        tmp_path / "st",
        ratio=0.5,
        importance="l2",
        round_to=8,
        runs=2,
        model_name="resnet-digits",
    )
    out = tmp_path / "st.onnx"
    result = CliRunner().invoke(app, ["export", "onnx", str(tmp_path / "st"), "--out", str(out), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.output)
    assert report["max_abs_diff"] < 1e-5 and report["batch_sizes"] == [1, 3]
    assert initializers(out)["stem.0.weight"].shape[0] == 8  # 16 channels halved


def test_cli_needs_an_input_shape_for_other_models(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(MODELS._items, "tiny-mlp", TinyMLP)  # a user-registered architecture
    path = tmp_path / "mlp.safetensors"
    save_artifact(path, TinyMLP(), model_info={"name": "tiny-mlp", "args": {}})
    code, _, err = call_main(
        monkeypatch, capsys, "export", "onnx", str(path), "--out", str(tmp_path / "m.onnx")
    )
    assert (
        code == 2 and err.startswith("error: --input-shape is needed") and len(err.strip().splitlines()) == 1
    )
    code, out, _ = call_main(
        monkeypatch,
        capsys,
        "export",
        "onnx",
        str(path),
        "--out",
        str(tmp_path / "m.onnx"),
        "--input-shape",
        "1,20",
    )
    assert code == 0 and "max abs diff" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-shape", "1,x,8"], "error: --input-shape must be positive integers separated by commas"),
        (["--input-shape", "1,0,8,8"], "error: --input-shape must be positive integers"),
        (["--exporter", "tvm"], "error: exporter must be one of dynamo, torchscript"),
    ],
)
def test_cli_bad_options_exit_2(monkeypatch, capsys, artifact, tmp_path, args, message):
    out = tmp_path / "m.onnx"
    code, _, err = call_main(monkeypatch, capsys, "export", "onnx", str(artifact), "--out", str(out), *args)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_a_dynamic_int8_artifact_in_one_line(monkeypatch, capsys, tmp_path):
    from prunekit.quant.ptq import quantize_model

    path = tmp_path / "q.safetensors"
    save_artifact(
        path,
        quantize_model(tiny_resnet(), activations="dynamic"),
        model_info={"name": "resnet-digits", "args": WIDTHS},
    )
    out = tmp_path / "q.onnx"
    code, _, err = call_main(monkeypatch, capsys, "export", "onnx", str(path), "--out", str(out))
    assert code == 2 and "dynamic activations" in err and len(err.strip().splitlines()) == 1
    assert "activations='static'" in err and "aten_amax" not in err
    assert not out.exists()


def test_cli_bad_sources_exit_2(monkeypatch, capsys, tmp_path):
    cases = {
        str(tmp_path / "missing.safetensors"): "error: SOURCE not found",
        str(tmp_path): "is not a `prunekit structured` output directory",
    }
    (tmp_path / "notes.txt").write_text("hi")
    cases[str(tmp_path / "notes.txt")] = "give a prunekit .safetensors artifact"
    anonymous = tmp_path / "anon.safetensors"
    save_artifact(anonymous, TinyMLP())
    cases[str(anonymous)] = "records no built-in architecture"
    for source, message in cases.items():
        code, _, err = call_main(
            monkeypatch, capsys, "export", "onnx", source, "--out", str(tmp_path / "m.onnx")
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (source, err)
