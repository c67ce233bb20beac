"""Model sources: a user's factory (with a weights file), torchvision (optional package) and a local
Hugging Face folder; each rebuilds its architecture from its recorded info, and a factory only where
running the user's code is allowed."""

from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
from safetensors.torch import save_file

from prunekit.errors import PrunekitError
from prunekit.models import build_model
from prunekit.models.sources import build, load_weights, rebuild


@pytest.fixture
def model_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make(width=6, classes=3):
                return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, classes))

            def not_a_model():
                return "model"
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_a_factory_model_gets_its_arguments_and_weights(model_module, tmp_path):
    reference = f"{model_module}:make"
    donor, _ = build("factory", reference, {"width": 5})
    save_file(donor.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": donor.state_dict()}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        model, info = build("factory", reference, {"width": 5}, weights=tmp_path / name)
        assert info == {"name": f"@factory:{reference}", "args": {"width": 5}}
        for key, value in donor.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(PrunekitError, match="w.pt does not fit the model: size mismatch for 1.weight"):
        build("factory", reference, {"width": 6}, weights=tmp_path / "w.pt")
    save_file({**donor.state_dict(), "extra": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(PrunekitError, match=r"0 missing key\(s\) \(e.g. \[\]\), 1 unexpected"):
        build("factory", reference, {"width": 5}, weights=tmp_path / "x.safetensors")
    with pytest.raises(PrunekitError, match="must return a torch.nn.Module, got str"):
        build("factory", f"{model_module}:not_a_model")


def test_a_factory_is_rebuilt_only_where_code_may_run(model_module):
    info = {"name": f"@factory:{model_module}:make", "args": {"width": 4}}
    with pytest.raises(PrunekitError, match="would run that code.*load_artifact\\(path, model=...\\)"):
        build_model(info["name"], info["args"])
    model = build_model(info["name"], info["args"], allow_code=True)
    assert model[1].weight.shape == (4, 16)


def test_weights_files_are_read_without_running_code(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(PrunekitError, match="weights: file not found"):
        load_weights(model, tmp_path / "none.pt", "model")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(PrunekitError, match="model.weights: cannot read"):
        load_weights(model, tmp_path / "bad.pt", "model")


def test_torchvision_is_optional_and_builds_without_downloading(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(PrunekitError, match="needs the 'torchvision' package, which is not installed"):
        build("torchvision", "resnet18", {"num_classes": 3})
    calls = []
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(
        list_models=lambda: ["resnet18"],
        get_model=lambda name, **kw: calls.append((name, kw)) or torch.nn.Linear(2, kw["num_classes"]),
    )
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    model, info = build("torchvision", "resnet18", {"num_classes": 3})
    assert calls == [("resnet18", {"weights": None, "num_classes": 3})]  # never pretrained: no download
    assert info == {"name": "@torchvision:resnet18", "args": {"num_classes": 3}}
    assert rebuild(info).out_features == 3
    with pytest.raises(PrunekitError, match="unknown torchvision model 'resnet81'.*did you mean 'resnet18'"):
        build("torchvision", "resnet81")


def test_a_saved_hugging_face_classifier_loads_offline_and_rebuilds(tmp_path):
    pytest.importorskip("transformers")
    from fixtures.hf import vit_classifier  # needs transformers

    torch.manual_seed(0)
    original = vit_classifier().eval()
    original.save_pretrained(tmp_path / "vit")
    model, info = build("hf", str(tmp_path / "vit"))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), original(pixel_values=x).logits)  # plain model(x) -> logits
    fresh = rebuild(info)  # from the recorded config alone: no folder needed
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    with pytest.raises(PrunekitError, match="no config.json"):
        build("hf", str(tmp_path))


def test_a_saved_text_classifier_gets_the_head_its_config_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=4,
    )
    torch.manual_seed(0)
    original = transformers.BertForSequenceClassification(config).eval()
    original.save_pretrained(tmp_path / "bert")
    model, info = build("hf", str(tmp_path / "bert"))  # no task given: config.json's architectures decide
    assert info["name"] == "@hf:sequence-classification"
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids.float()), original(input_ids=ids).logits)  # ids as floats, cast back
